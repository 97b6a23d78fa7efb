//! Keytabs are secrets: a keytab that group or other can read, or that
//! someone else controls, is refused before Kerberos sees it (issue 12).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use canopy_gss::krb::{check_keytab, keytab_file};

#[test]
fn keytab_names_map_to_files() {
    let p = |s: &str| Some(PathBuf::from(s));
    assert_eq!(
        keytab_file("FILE:/etc/canopy/canopy.keytab"),
        p("/etc/canopy/canopy.keytab")
    );
    assert_eq!(keytab_file("WRFILE:/tmp/k"), p("/tmp/k"));
    assert_eq!(keytab_file("/etc/krb5.keytab"), p("/etc/krb5.keytab"));
    assert_eq!(keytab_file("rel/k:1"), p("rel/k:1"));
    assert_eq!(keytab_file("MEMORY:x"), None);
    assert_eq!(keytab_file("KEYRING:persistent:0"), None);
    assert_eq!(keytab_file("FILE:"), None);
}

#[test]
fn readable_keytabs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let kt = dir.path().join("canopy.keytab");
    std::fs::write(&kt, b"\x05\x02").unwrap();
    let name = format!("FILE:{}", kt.display());
    let set = |mode| std::fs::set_permissions(&kt, std::fs::Permissions::from_mode(mode)).unwrap();
    set(0o600);
    check_keytab(&name).unwrap();
    check_keytab(kt.to_str().unwrap()).unwrap();
    for mode in [0o640, 0o604, 0o644] {
        set(mode);
        let e = check_keytab(&name).unwrap_err().to_string();
        assert!(
            e.contains(&format!("chmod 600 {}", kt.display())),
            "{mode:o}: {e}"
        );
        assert!(e.contains(&format!("{mode:04o}")), "{mode:o}: {e}");
    }
    // Not a file: nothing to check here.
    check_keytab("MEMORY:test").unwrap();
    // Missing: refused, naming the file.
    let e = check_keytab(&format!("FILE:{}/nope", dir.path().display())).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}
