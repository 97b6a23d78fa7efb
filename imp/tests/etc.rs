//! The example imp.toml shipped in etc/ parses and means what its comments
//! say.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use canopy_imp::config::{ImpConfig, MAX_LIFETIME};

#[test]
fn etc_imp_toml_parses_and_matches_its_comments() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../etc/imp.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    // parse, not load: a checkout's owner and modes are not an install's.
    let c = ImpConfig::parse(&text, &path.display().to_string()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.broker_user, "canopy");
    assert!(c.users.contains("alice") && !c.users.contains("root"));
    assert!(c.groups.contains("hpc"));
    assert!(c
        .allowlist("alice")
        .unwrap()
        .contains(Path::new("/usr/bin/id")));
    assert_eq!(
        c.allowlist("bob").unwrap().iter().collect::<Vec<_>>(),
        [&PathBuf::from("/usr/bin/hostname")]
    );
    assert!(c.node_attestation_keys.is_none(), "accept = false");
    assert!(c.max_request_lifetime <= MAX_LIFETIME);
    assert_eq!(c.instances.get("canopy"), Some(&0));
    assert_eq!(c.receipt_key, PathBuf::from("/etc/canopy/imp/receipt.key"));

    // Listing root anywhere makes the example refused, with file:line:col.
    let with_root = text.replace(
        "users = [\"alice\", \"bob\"]",
        "users = [\"alice\", \"root\"]",
    );
    let err = ImpConfig::parse(&with_root, "imp.toml")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("imp.toml:") && err.contains("users[1]: root is always refused"),
        "{err}"
    );
}
