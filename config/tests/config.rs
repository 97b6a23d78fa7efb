//! Loading, merging, validation and resolution of system-instance configs.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use canopy_config::{
    BudgetSettings, Config, ConfigError, HostlistError, Mechanism, PublicCerts, Timing,
};

const CERTS: &str = "curve_cert = \"/etc/canopy/curve/%h.key_secret\"\ncurve_public_certs = \"/etc/canopy/curve/public\"\n";

fn parse(text: &str) -> Config {
    Config::parse(text, "t.toml").unwrap_or_else(|e| panic!("{e}\n--- input ---\n{text}"))
}

fn refuse(text: &str) -> ConfigError {
    match Config::parse(text, "t.toml") {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e,
    }
}

/// The error names `file:line:` and `key`, in the message and the fields.
fn assert_at(e: &ConfigError, file: &str, line: u32, key: &str) {
    let msg = e.to_string();
    let loc = e.location().unwrap_or_else(|| panic!("no location: {msg}"));
    assert_eq!(loc.file, Path::new(file), "{msg}");
    assert_eq!(loc.line, line, "{msg}");
    assert_eq!(e.key(), Some(key), "{msg}");
    assert!(msg.starts_with(&format!("{file}:{line}:")), "{msg}");
    assert!(msg.contains(key), "{msg}");
}

fn bootstrap(hosts: &str) -> String {
    format!("[bootstrap]\n{CERTS}hosts = [\n{hosts}\n]\n")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    p
}

fn tempdir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    d
}

// ---------------------------------------------------------------- parsing

#[test]
fn full_example_parses_with_every_table() {
    let c = parse(
        r#"
[bootstrap]
default_port = 8050
default_bind = "tcp://eth0:%p"
default_connect = "tcp://%h:%p"
mechanism = "curve"
curve_cert = "/etc/canopy/curve/%h.key_secret"
curve_public_certs = "/etc/canopy/curve/public"
fanout = 2
hosts = [
  { host = "node[0-127,200]" },
  { host = "login1", bind = "tcp://10.0.0.1:8050", connect = "tcp://login1:8050", parent = "node0" },
]
[gssapi]
service = "canopy"
keytab = "/etc/canopy/canopy.keytab"
realm = "HPC.EXAMPLE"
[timing]
heartbeat = 2.0
torpid = 10.0
lost = 30.0
[policy]
file = "/etc/canopy/policy.toml"
audit_log = "/var/log/canopy/audit.log"
"#,
    );
    assert_eq!(c.size(), 130);
    assert_eq!(c.host(128), Some("node200"));
    assert_eq!(c.host(129), Some("login1"));
    assert_eq!(c.mechanism(), Mechanism::Curve);
    let b = c.bootstrap();
    assert_eq!(b.default_port, 8050);
    assert_eq!(b.fanout, 2);
    assert_eq!(b.hosts.len(), 2);
    assert_eq!(b.hosts[1].parent.as_deref(), Some("node0"));
    assert_eq!(b.hosts[1].location.line, 12);
    let g = c.gssapi().unwrap();
    assert_eq!(g.service, "canopy");
    assert_eq!(
        g.keytab.as_deref(),
        Some(Path::new("/etc/canopy/canopy.keytab"))
    );
    assert_eq!(g.realm.as_deref(), Some("HPC.EXAMPLE"));
    assert_eq!(*c.timing(), Timing::default());
    assert_eq!(
        c.policy().file.as_deref(),
        Some(Path::new("/etc/canopy/policy.toml"))
    );
    assert_eq!(
        c.policy().audit_log.as_deref(),
        Some(Path::new("/var/log/canopy/audit.log"))
    );
    assert_eq!(c.topology().parent(129), Some(0));
    assert!(c.topology().children(0).contains(&129));
    assert_eq!(c.files(), [PathBuf::from("t.toml")]);
}

#[test]
fn defaults_fill_in() {
    let c = parse("[bootstrap]\nhosts = [ { host = \"solo\" } ]\n");
    let b = c.bootstrap();
    assert_eq!(b.default_port, 8050);
    assert_eq!(b.default_bind, "tcp://*:%p");
    assert_eq!(b.default_connect, "tcp://%h:%p");
    assert_eq!(b.mechanism, Mechanism::Curve);
    assert_eq!(b.fanout, 2);
    assert!(c.gssapi().is_none());
    let t = c.timing();
    assert_eq!(t.heartbeat, Duration::from_secs(2));
    assert_eq!(t.torpid, Duration::from_secs(10));
    assert_eq!(t.lost, Duration::from_secs(30));
    let l = t.to_liveness();
    assert_eq!(
        (l.heartbeat_ms, l.torpid_ms, l.lost_ms),
        (2000, 10_000, 30_000)
    );
    assert_eq!(c.policy().file, None);
    // one host needs no certificates
    assert_eq!(c.cert_path(0), None);
    assert_eq!(c.bind_endpoint(0).as_deref(), Some("tcp://*:8050"));
}

#[test]
fn array_of_tables_form_is_accepted() {
    let c = parse(&format!(
        "[bootstrap]\n{CERTS}\n[[bootstrap.hosts]]\nhost = \"n[0-2]\"\n\n[[bootstrap.hosts]]\nhost = \"m0\"\nparent = \"n2\"\n"
    ));
    assert_eq!(c.size(), 4);
    assert_eq!(c.topology().parent(3), Some(2));
    assert_eq!(c.bootstrap().hosts[1].location.line, 9);
}

#[test]
fn timing_accepts_integers_and_checks_order() {
    let c = parse(&format!(
        "{}[timing]\nheartbeat = 1\ntorpid = 5\nlost = 7.5\n",
        bootstrap("{ host = \"a\" }")
    ));
    assert_eq!(c.timing().heartbeat, Duration::from_secs(1));
    assert_eq!(c.timing().lost, Duration::from_millis(7500));

    let e = refuse(&format!(
        "{}[timing]\nheartbeat = 3\ntorpid = 2\n",
        bootstrap("{ host = \"a\" }")
    ));
    assert_at(&e, "t.toml", 9, "timing.torpid");
    assert!(
        e.to_string()
            .contains("must be longer than timing.heartbeat"),
        "{e}"
    );
    // only lost set, below the default torpid: blame lost
    let e = refuse(&format!(
        "{}[timing]\nlost = 5\n",
        bootstrap("{ host = \"a\" }")
    ));
    assert_at(&e, "t.toml", 8, "timing.lost");
    let e = refuse(&format!(
        "{}[timing]\nheartbeat = -1\n",
        bootstrap("{ host = \"a\" }")
    ));
    assert_at(&e, "t.toml", 8, "timing.heartbeat");
    let e = refuse(&format!(
        "{}[timing]\nheartbeat = nan\n",
        bootstrap("{ host = \"a\" }")
    ));
    assert_at(&e, "t.toml", 8, "timing.heartbeat");
}

// ------------------------------------------------------------- bad input

#[test]
fn unknown_keys_are_refused_with_location() {
    let e = refuse("[bootstrap]\nhosts = [ { host = \"a\" } ]\ndefault_prot = 1\n");
    assert!(matches!(e, ConfigError::UnknownKey { .. }), "{e}");
    assert_at(&e, "t.toml", 3, "bootstrap.default_prot");
    assert!(
        e.to_string().contains("default_port"),
        "lists the expected keys: {e}"
    );

    let e = refuse(
        "[bootstrap]\nhosts = [\n  { host = \"a\" },\n  { host = \"b\", prent = \"a\" },\n]\n",
    );
    assert_at(&e, "t.toml", 4, "bootstrap.hosts[1].prent");

    let e = refuse("[bootstrap]\nhosts = [ { host = \"a\" } ]\n\n[tbon]\nfanout = 2\n");
    assert_at(&e, "t.toml", 4, "tbon");

    let e = refuse("[bootstrap]\nhosts = [ { host = \"a\" } ]\n[timing]\nheartbeet = 1\n");
    assert_at(&e, "t.toml", 4, "timing.heartbeet");
}

#[test]
fn type_and_syntax_errors_have_location() {
    let e = refuse("[bootstrap]\ndefault_port = \"8050\"\nhosts = [ { host = \"a\" } ]\n");
    assert!(matches!(e, ConfigError::BadType { .. }), "{e}");
    assert_at(&e, "t.toml", 2, "bootstrap.default_port");

    let e = refuse("[bootstrap]\nmechanism = \"kerberos\"\nhosts = [ { host = \"a\" } ]\n");
    assert_at(&e, "t.toml", 2, "bootstrap.mechanism");
    assert!(e.to_string().contains("gssapi"), "{e}");

    let e = refuse("[bootstrap]\nhosts = [ { host = \"a\" } ]\ndefault_port = \n");
    assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
    assert_at(&e, "t.toml", 3, "bootstrap.default_port");

    let e = refuse("[bootstrap]\nhosts = [ { bind = \"tcp://x:1\" } ]\n");
    assert!(matches!(e, ConfigError::MissingKey { .. }), "{e}");
    assert_at(&e, "t.toml", 2, "bootstrap.hosts[0].host");

    let e = refuse("[bootstrap]\ncurve_public_certs = 5\nhosts = [ { host = \"a\" } ]\n");
    assert_at(&e, "t.toml", 2, "bootstrap.curve_public_certs");
}

#[test]
fn missing_pieces_are_named() {
    let e = refuse("# nothing\n");
    assert_at(&e, "t.toml", 1, "bootstrap");
    let e = refuse("\n[bootstrap]\nfanout = 2\n");
    assert_at(&e, "t.toml", 2, "bootstrap.hosts");
    let e = refuse("[bootstrap]\nhosts = []\n");
    assert_at(&e, "t.toml", 2, "bootstrap.hosts");
    // curve with several hosts needs certificates
    let e = refuse("[bootstrap]\nhosts = [ { host = \"a,b\" } ]\n");
    assert_at(&e, "t.toml", 1, "bootstrap.curve_cert");
    let e = refuse("[bootstrap]\ncurve_cert = \"/k/%h\"\nhosts = [ { host = \"a,b\" } ]\n");
    assert_at(&e, "t.toml", 1, "bootstrap.curve_public_certs");
}

#[test]
fn duplicate_host_names_both_lines() {
    let e = refuse(&bootstrap(
        "  { host = \"node[0-3]\" },\n  { host = \"login1\" },\n  { host = \"node[3-4]\" },",
    ));
    assert!(matches!(e, ConfigError::DuplicateHost { .. }), "{e}");
    assert_at(&e, "t.toml", 7, "bootstrap.hosts[2].host");
    let msg = e.to_string();
    assert!(msg.contains("`node3`"), "{msg}");
    assert!(
        msg.contains("already listed at t.toml:5:"),
        "names the first line: {msg}"
    );

    // within one hostlist
    let e = refuse(&bootstrap("{ host = \"n[1,2,1]\" }"));
    assert_at(&e, "t.toml", 5, "bootstrap.hosts[0].host");

    // the same short name twice is the same host listed twice
    let e = refuse(&bootstrap(
        "{ host = \"node0\" },\n{ host = \"NODE0.cluster\" }",
    ));
    assert_at(&e, "t.toml", 6, "bootstrap.hosts[1].host");
    assert!(e.to_string().contains("before the first '.'"), "{e}");
}

#[test]
fn bad_hostlist_is_located() {
    let e = refuse(&bootstrap(
        "  { host = \"node0\" },\n  { host = \"node[1-3\" },",
    ));
    match &e {
        ConfigError::BadHostlist { source, .. } => {
            assert_eq!(**source, HostlistError::Unclosed { pos: 5 })
        }
        other => panic!("{other}"),
    }
    assert_at(&e, "t.toml", 6, "bootstrap.hosts[1].host");
    assert_eq!(e.location().unwrap().column, 17, "points at the '[': {e}");
    assert!(e.to_string().contains("bad hostlist \"node[1-3\""), "{e}");
    assert!(e.to_string().contains("add the matching ']'"), "{e}");

    let e = refuse(&bootstrap("{ host = \"n[9-2]\" }"));
    assert_at(&e, "t.toml", 5, "bootstrap.hosts[0].host");
    let e = refuse(&bootstrap("{ host = \"n[0-999999]\" },\n{ host = \"m\" }"));
    assert!(e.to_string().contains("more than 1000000 hosts"), "{e}");
    assert_at(&e, "t.toml", 6, "bootstrap.hosts[1].host");
    let e = refuse(&bootstrap("{ host = \"\" }"));
    assert_at(&e, "t.toml", 5, "bootstrap.hosts[0].host");
}

#[test]
fn parent_must_be_listed() {
    let e = refuse(&bootstrap(
        "{ host = \"n[0-3]\" },\n{ host = \"login1\", parent = \"mgmt0\" }",
    ));
    assert!(matches!(e, ConfigError::UnknownParent { .. }), "{e}");
    assert_at(&e, "t.toml", 6, "bootstrap.hosts[1].parent");
    assert!(e.to_string().contains("`mgmt0`"), "{e}");
}

#[test]
fn parent_cycles_are_refused() {
    // n1's default parent is n0; n0..: n2 -> n3 -> n2
    let e = refuse(&bootstrap(
        "{ host = \"n0\" },\n{ host = \"n1\" },\n{ host = \"n2\", parent = \"n3\" },\n{ host = \"n3\", parent = \"n2\" }",
    ));
    assert!(matches!(e, ConfigError::ParentCycle { .. }), "{e}");
    let loc = e.location().unwrap();
    assert!(loc.line == 7 || loc.line == 8, "{e}");
    assert!(
        e.to_string().contains("n2 -> n3 -> n2") || e.to_string().contains("n3 -> n2 -> n3"),
        "{e}"
    );

    // a default edge into an explicit one: n1 -> n0 is default, n0 is root,
    // so make n2 -> n4 (explicit) and n4 -> n1 (default for fanout 1: n4 -> n3 -> n2)
    let e = refuse(&format!(
        "[bootstrap]\n{CERTS}fanout = 1\nhosts = [\n{{ host = \"n[0-1]\" }},\n{{ host = \"n2\", parent = \"n4\" }},\n{{ host = \"n[3-4]\" }},\n]\n"
    ));
    assert_at(&e, "t.toml", 7, "bootstrap.hosts[1].parent");

    // a host that is its own parent
    let e = refuse(&bootstrap(
        "{ host = \"n0\" },\n{ host = \"n[1-3]\", parent = \"n2\" }",
    ));
    assert_at(&e, "t.toml", 6, "bootstrap.hosts[1].parent");
    assert!(e.to_string().contains("n2 -> n2"), "{e}");

    // rank 0 cannot have a parent
    let e = refuse(&bootstrap(
        "{ host = \"n0\", parent = \"n1\" },\n{ host = \"n1\" }",
    ));
    assert!(matches!(e, ConfigError::RootHasParent { .. }), "{e}");
    assert_at(&e, "t.toml", 5, "bootstrap.hosts[0].parent");
}

#[test]
fn gssapi_needs_its_table() {
    let e = refuse("[bootstrap]\nhosts = [ { host = \"a,b\" } ]\nmechanism = \"gssapi\"\n");
    assert!(matches!(e, ConfigError::MissingGssapi { .. }), "{e}");
    assert_at(&e, "t.toml", 3, "bootstrap.mechanism");

    let c =
        parse("[bootstrap]\nhosts = [ { host = \"a,b\" } ]\nmechanism = \"gssapi\"\n[gssapi]\n");
    assert_eq!(c.mechanism(), Mechanism::Gssapi);
    let g = c.gssapi().unwrap();
    assert_eq!(g.service, "canopy");
    assert_eq!(g.keytab, None);
    assert_eq!(g.kex_port, None, "default: the connect endpoint's port + 1");
    assert_eq!(g.principal("Cn001"), "canopy/Cn001");
    assert_eq!(g.principal("cn001"), "canopy/cn001");
    let c = parse(
        "[bootstrap]\nhosts = [ { host = \"a\" } ]\nmechanism = \"gssapi\"\n[gssapi]\nrealm = \"HPC.EXAMPLE\"\nkex_port = 9000\n",
    );
    let g = c.gssapi().unwrap();
    assert_eq!(g.kex_port, Some(9000));
    assert_eq!(g.max_bindings_per_principal, None, "default: 1000");
    let c = parse(
        "[bootstrap]\nhosts = [ { host = \"a\" } ]\nmechanism = \"gssapi\"\n[gssapi]\nmax_bindings_per_principal = 50\n",
    );
    assert_eq!(c.gssapi().unwrap().max_bindings_per_principal, Some(50));
    let e = refuse(
        "[bootstrap]\nhosts = [ { host = \"a\" } ]\n[gssapi]\nmax_bindings_per_principal = 0\n",
    );
    assert_at(&e, "t.toml", 4, "gssapi.max_bindings_per_principal");
    assert_eq!(g.principal("a"), "canopy/a@HPC.EXAMPLE");
    let e = refuse("[bootstrap]\nhosts = [ { host = \"a\" } ]\n[gssapi]\nkex_port = 0\n");
    assert_at(&e, "t.toml", 4, "gssapi.kex_port");
    // gssapi needs no CURVE certificates
    assert_eq!(c.cert_path(1), None);

    let e =
        refuse("[bootstrap]\nhosts = [ { host = \"a\" } ]\n[gssapi]\nservice = \"canopy/host\"\n");
    assert_at(&e, "t.toml", 4, "gssapi.service");
    let e =
        refuse("[bootstrap]\nhosts = [ { host = \"a\" } ]\n[gssapi]\nkeytab = \"canopy.keytab\"\n");
    assert_at(&e, "t.toml", 4, "gssapi.keytab");
    assert!(e.to_string().contains("absolute path"), "{e}");
}

#[test]
fn ports_out_of_range_are_refused() {
    for bad in ["0", "65536", "-1", "99999999999"] {
        let e = refuse(&format!(
            "[bootstrap]\nhosts = [ {{ host = \"a\" }} ]\ndefault_port = {bad}\n"
        ));
        assert!(matches!(e, ConfigError::BadPort { .. }), "{e}");
        assert_at(&e, "t.toml", 3, "bootstrap.default_port");
        assert!(e.to_string().contains("from 1 to 65535"), "{e}");
    }
    let e = refuse(&bootstrap(
        "{ host = \"a\" },\n{ host = \"b\", bind = \"tcp://eth0:70000\" }",
    ));
    assert!(matches!(e, ConfigError::BadPort { port: 70000, .. }), "{e}");
    assert_at(&e, "t.toml", 6, "bootstrap.hosts[1].bind");
    let e = refuse(&format!(
        "[bootstrap]\n{CERTS}default_connect = \"tcp://%h\"\nhosts = [ {{ host = \"a,b\" }} ]\n"
    ));
    assert_at(&e, "t.toml", 4, "bootstrap.default_connect");
    assert!(e.to_string().contains("has no port"), "{e}");
    let e = refuse(&format!(
        "[bootstrap]\n{CERTS}default_bind = \"udp://*:%p\"\nhosts = [ {{ host = \"a,b\" }} ]\n"
    ));
    assert_at(&e, "t.toml", 4, "bootstrap.default_bind");
}

#[test]
fn unknown_tokens_are_refused() {
    let e = refuse("[bootstrap]\ndefault_bind = \"tcp://%i:%p\"\nhosts = [ { host = \"a\" } ]\n");
    assert!(matches!(e, ConfigError::BadToken { .. }), "{e}");
    assert_at(&e, "t.toml", 2, "bootstrap.default_bind");
    assert!(e.to_string().contains("`%i`"), "{e}");

    let e = refuse("[bootstrap]\ncurve_cert = \"/k/%p.key\"\nhosts = [ { host = \"a\" } ]\n");
    assert_at(&e, "t.toml", 2, "bootstrap.curve_cert");
    let e = refuse(&bootstrap("{ host = \"a\", connect = \"tcp://%H:%p\" }"));
    assert_at(&e, "t.toml", 5, "bootstrap.hosts[0].connect");
    let e =
        refuse("[bootstrap]\nhosts = [ { host = \"a\" } ]\n[policy]\nfile = \"/etc/%h.toml\"\n");
    assert_at(&e, "t.toml", 4, "policy.file");
    // %% is a literal percent
    let c = parse("[bootstrap]\ncurve_cert = \"/k/100%%/%h\"\nhosts = [ { host = \"a\" } ]\n");
    assert_eq!(c.cert_path(0), Some(PathBuf::from("/k/100%/a")));
}

#[test]
fn paths_must_be_absolute() {
    let e = refuse("[bootstrap]\ncurve_cert = \"curve/%h\"\nhosts = [ { host = \"a\" } ]\n");
    assert_at(&e, "t.toml", 2, "bootstrap.curve_cert");
    let e =
        refuse("[bootstrap]\nhosts = [ { host = \"a\" } ]\n[policy]\naudit_log = \"audit.log\"\n");
    assert_at(&e, "t.toml", 4, "policy.audit_log");
}

// ------------------------------------------------------------ files, dirs

#[test]
fn directory_is_merged_in_lexical_order() {
    let d = tempdir();
    write(
        d.path(),
        "10-hosts.toml",
        "[bootstrap]\nhosts = [ { host = \"n[0-5]\" } ]\n",
    );
    write(
        d.path(),
        "00-base.toml",
        &format!("[bootstrap]\ndefault_port = 9000\n{CERTS}"),
    );
    write(d.path(), "20-timing.toml", "[timing]\nheartbeat = 1.5\n");
    write(d.path(), "README", "not toml = at all [");
    write(d.path(), ".hidden.toml", "garbage [");
    fs::create_dir(d.path().join("sub.toml")).unwrap();
    let c = Config::load(d.path()).unwrap();
    let names: Vec<_> = c
        .files()
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["00-base.toml", "10-hosts.toml", "20-timing.toml"]);
    assert_eq!(c.size(), 6);
    assert_eq!(c.bootstrap().default_port, 9000);
    assert_eq!(c.connect_endpoint(3).as_deref(), Some("tcp://n3:9000"));
    assert_eq!(c.timing().heartbeat, Duration::from_millis(1500));
    // the same content as one file has the same fingerprint
    let one = parse(&format!(
        "[bootstrap]\ndefault_port = 9000\n{CERTS}hosts = [ {{ host = \"n[0-5]\" }} ]\n[timing]\nheartbeat = 1.5\n"
    ));
    assert_eq!(one.fingerprint(), c.fingerprint());
}

#[test]
fn key_in_two_files_names_both() {
    let d = tempdir();
    write(
        d.path(),
        "a.toml",
        "[bootstrap]\n\ndefault_port = 9000\nhosts = [ { host = \"x\" } ]\n",
    );
    write(
        d.path(),
        "b.toml",
        "# override\n[bootstrap]\ndefault_port = 9001\n",
    );
    let e = Config::load(d.path()).unwrap_err();
    assert!(matches!(e, ConfigError::DuplicateKey { .. }), "{e}");
    let b = d.path().join("b.toml");
    assert_at(&e, b.to_str().unwrap(), 3, "bootstrap.default_port");
    let a = d.path().join("a.toml");
    assert!(
        e.to_string()
            .contains(&format!("already set at {}:3:", a.display())),
        "{e}"
    );
}

#[test]
fn errors_in_a_directory_name_the_right_file() {
    let d = tempdir();
    write(d.path(), "a.toml", &format!("[bootstrap]\n{CERTS}"));
    let b = write(
        d.path(),
        "b.toml",
        "[bootstrap]\nhosts = [\n  { host = \"n0\" },\n  { host = \"n1\", parent = \"zz\" },\n]\n",
    );
    let e = Config::load(d.path()).unwrap_err();
    assert_at(&e, b.to_str().unwrap(), 4, "bootstrap.hosts[1].parent");
}

#[test]
fn writable_files_and_directories_are_refused() {
    let d = tempdir();
    let f = write(
        d.path(),
        "canopy.toml",
        "[bootstrap]\nhosts = [ { host = \"a\" } ]\n",
    );
    assert!(Config::load(&f).is_ok());
    assert!(Config::load(d.path()).is_ok());

    fs::set_permissions(&f, fs::Permissions::from_mode(0o664)).unwrap();
    let e = Config::load(&f).unwrap_err();
    assert!(
        matches!(e, ConfigError::InsecurePermissions { mode: 0o664, .. }),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains(&format!("chmod go-w {}", f.display())),
        "{e}"
    );
    let e = Config::load(d.path()).unwrap_err();
    assert!(matches!(e, ConfigError::InsecurePermissions { .. }), "{e}");

    fs::set_permissions(&f, fs::Permissions::from_mode(0o646)).unwrap();
    assert!(matches!(
        Config::load(&f),
        Err(ConfigError::InsecurePermissions { .. })
    ));

    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o775)).unwrap();
    let e = Config::load(d.path()).unwrap_err();
    match &e {
        ConfigError::InsecurePermissions { path, .. } => assert_eq!(path, d.path()),
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("chmod go-w"), "{e}");
    // The file alone is refused too: a directory on its path that group
    // can write lets group swap the file (StrictModes, issue 12).
    assert!(matches!(Config::load(&f), Err(ConfigError::Untrusted(_))));
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    assert!(Config::load(&f).is_ok());
}

#[test]
fn missing_and_empty_are_reported() {
    let d = tempdir();
    let e = Config::load(d.path().join("nope.toml")).unwrap_err();
    assert!(matches!(e, ConfigError::Io { .. }), "{e}");
    let e = Config::load(d.path()).unwrap_err();
    assert!(matches!(e, ConfigError::NoConfigFiles { .. }), "{e}");
    let f = d.path().join("bin.toml");
    fs::write(&f, [0xff, 0xfe, 0x00]).unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(Config::load(&f), Err(ConfigError::Io { .. })));
}

// ------------------------------------------------------------- resolution

#[test]
fn rank_of_accepts_short_and_fqdn() {
    let c = parse(&bootstrap(
        "{ host = \"node[0-3]\" },\n{ host = \"login1.hpc.example\" }",
    ));
    assert_eq!(c.rank_of("node2"), Some(2));
    assert_eq!(c.rank_of("node2.hpc.example"), Some(2));
    assert_eq!(c.rank_of("NODE2.hpc.example"), Some(2));
    assert_eq!(c.rank_of("login1.hpc.example"), Some(4));
    assert_eq!(c.rank_of("login1"), Some(4));
    assert_eq!(c.rank_of("login1.other.example"), None);
    assert_eq!(c.rank_of("node4"), None);
    assert_eq!(c.rank_of(""), None);
    assert_eq!(c.rank_of("node"), None);
}

#[test]
fn topology_is_kary_by_fanout() {
    let c = parse(&format!(
        "[bootstrap]\n{CERTS}fanout = 3\nhosts = [ {{ host = \"n[0-12]\" }} ]\n"
    ));
    let t = c.topology();
    assert_eq!(t.size(), 13);
    assert_eq!(t.children(0), &[1, 2, 3]);
    assert_eq!(t.children(1), &[4, 5, 6]);
    assert_eq!(t.children(4), &[] as &[u32]);
    assert_eq!(t.parent(12), Some(3));
    assert_eq!(t.height(), 2);
    let o = t.kary().expect("pure k-ary");
    assert_eq!((o.size(), o.fanout()), (13, 3));

    let c = parse(&bootstrap("{ host = \"n[0-7]\" }"));
    assert_eq!(c.topology().parent(7), Some(3));
    assert_eq!(c.topology().depth(7), 3);
}

#[test]
fn explicit_parents_override_the_default() {
    // flux-core's three-level example, each host listed once
    let c = parse(&format!(
        "[bootstrap]\n{CERTS}hosts = [\n  {{ host = \"test0\" }},\n  {{ host = \"test[1,128]\", parent = \"test0\" }},\n  {{ host = \"test[2-127]\", parent = \"test1\" }},\n  {{ host = \"test[129-255]\", parent = \"test128\" }},\n]\n"
    ));
    let t = c.topology();
    let r = |h: &str| c.rank_of(h).unwrap();
    assert_eq!(t.children(0), &[r("test1"), r("test128")]);
    assert_eq!(t.children(r("test1")).len(), 126);
    assert_eq!(t.children(r("test128")).len(), 127);
    assert_eq!(t.parent(r("test200")), Some(r("test128")));
    assert_eq!(t.height(), 2);
    assert!(t.kary().is_none());

    // mixed: only login1 overridden, the rest binary
    let c = parse(&bootstrap(
        "{ host = \"n[0-6]\" },\n{ host = \"login1\", parent = \"n0\" }",
    ));
    let t = c.topology();
    assert_eq!(t.parent(7), Some(0));
    assert_eq!(t.children(0), &[1, 2, 7]);
    assert_eq!(t.children(3), &[] as &[u32], "rank 7 left rank 3");
    assert_eq!(t.parent(6), Some(2));
}

#[test]
fn endpoints_substitute_host_and_port() {
    let c = parse(&format!(
        "[bootstrap]\n{CERTS}default_port = 8050\ndefault_bind = \"tcp://eth0:%p\"\ndefault_connect = \"tcp://e%h:%p\"\nhosts = [\n  {{ host = \"mgmt\", bind = \"tcp://en4:9001\", connect = \"tcp://mgmt-ib:9001\" }},\n  {{ host = \"n[1-3]\" }},\n  {{ host = \"gw\", connect = \"tcp://%h.ib:%p\" }},\n]\n"
    ));
    assert_eq!(c.bind_endpoint(0).as_deref(), Some("tcp://en4:9001"));
    assert_eq!(c.connect_endpoint(0).as_deref(), Some("tcp://mgmt-ib:9001"));
    assert_eq!(c.bind_endpoint(2).as_deref(), Some("tcp://eth0:8050"));
    assert_eq!(c.connect_endpoint(2).as_deref(), Some("tcp://en2:8050"));
    assert_eq!(c.bind_endpoint(4).as_deref(), Some("tcp://eth0:8050"));
    assert_eq!(c.connect_endpoint(4).as_deref(), Some("tcp://gw.ib:8050"));
    assert_eq!(c.bind_endpoint(5), None);
    assert_eq!(c.connect_endpoint(99), None);
}

#[test]
fn certificate_paths_from_directory_or_list() {
    let c = parse(&bootstrap("{ host = \"n[0-2]\" }"));
    assert_eq!(
        c.cert_path(1),
        Some(PathBuf::from("/etc/canopy/curve/n1.key_secret"))
    );
    assert_eq!(
        c.public_cert_path(2),
        Some(PathBuf::from("/etc/canopy/curve/public/n2.key"))
    );
    assert_eq!(c.public_cert_path(3), None);
    assert!(matches!(
        c.bootstrap().curve_public_certs,
        Some(PublicCerts::Directory(_))
    ));

    let c = parse(
        "[bootstrap]\ncurve_cert = \"/s/%h\"\ncurve_public_certs = [\"/p/root.pub\", \"/p/%h.pub\"]\nhosts = [ { host = \"a,b\" } ]\n",
    );
    assert_eq!(c.public_cert_path(0), Some(PathBuf::from("/p/root.pub")));
    assert_eq!(c.public_cert_path(1), Some(PathBuf::from("/p/b.pub")));

    let e = refuse("[bootstrap]\ncurve_cert = \"/s/%h\"\ncurve_public_certs = [\"/p/a.pub\"]\nhosts = [ { host = \"a,b\" } ]\n");
    assert_at(&e, "t.toml", 3, "bootstrap.curve_public_certs");
    assert!(
        e.to_string()
            .contains("has 1 paths but bootstrap.hosts names 2 hosts"),
        "{e}"
    );
    let e = refuse("[bootstrap]\ncurve_cert = \"/s/%h\"\ncurve_public_certs = [\"/p/a.pub\", \"rel/b\"]\nhosts = [ { host = \"a,b\" } ]\n");
    assert_at(&e, "t.toml", 3, "bootstrap.curve_public_certs[1]");
}

#[test]
fn fingerprint_is_stable() {
    let a = parse(&bootstrap(
        "{ host = \"node[0-3]\" },\n{ host = \"login1\", parent = \"node0\" }",
    ));
    // different spelling, comments, endpoints, ports, paths, timing
    let b = parse(
        r#"# the same cluster
[bootstrap]
default_port = 9999
default_bind = "tcp://ib0:%p"
curve_cert = "/other/%h"
curve_public_certs = "/other/pub"
hosts = [ { host = "node0,node1,node[2-3]" }, { host = "login1", parent = "NODE0" } ]
[timing]
lost = 60
"#,
    );
    assert_eq!(a.fingerprint(), b.fingerprint());
    assert_eq!(a.fingerprint().len(), 64);
    assert!(a
        .fingerprint()
        .chars()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    // an explicit parent equal to the default changes nothing
    let c = parse(&bootstrap("{ host = \"node[0-2]\" },\n{ host = \"node3\", parent = \"node1\" },\n{ host = \"login1\", parent = \"node0\" }"));
    assert_eq!(a.fingerprint(), c.fingerprint());
    // and it is the same value run after run
    assert_eq!(
        a.fingerprint(),
        parse(&bootstrap(
            "{ host = \"node[0-3]\" },\n{ host = \"login1\", parent = \"node0\" }"
        ))
        .fingerprint()
    );
}

#[test]
fn fingerprint_is_sensitive() {
    let base = parse(&bootstrap("{ host = \"node[0-3]\" }"));
    let variants = [
        bootstrap("{ host = \"node[0-4]\" }"),     // another host
        bootstrap("{ host = \"node[0-2]\" }"),     // one fewer
        bootstrap("{ host = \"node[0,2,1,3]\" }"), // order (ranks)
        bootstrap("{ host = \"node[0-2]\" },\n{ host = \"node3\", parent = \"node0\" }"), // tree
        format!("[bootstrap]\n{CERTS}fanout = 1\nhosts = [ {{ host = \"node[0-3]\" }} ]\n"), // fanout: a chain
        "[bootstrap]\nmechanism = \"gssapi\"\nhosts = [ { host = \"node[0-3]\" } ]\n[gssapi]\n"
            .to_string(),
        bootstrap("{ host = \"node[0-3].x\" }"), // names
    ];
    let mut seen = vec![base.fingerprint().to_string()];
    for v in &variants {
        let f = parse(v).fingerprint().to_string();
        assert!(!seen.contains(&f), "same fingerprint for:\n{v}");
        seen.push(f);
    }
}

#[test]
fn large_instance_loads() {
    let c = parse(&bootstrap("{ host = \"rack[0-99]n[000-999]\" }"));
    assert_eq!(c.size(), 100_000);
    assert_eq!(c.rank_of("rack42n007"), Some(42_007));
    assert_eq!(c.topology().parent(99_999), Some(49_999));
    assert!(
        c.summary()
            .contains("100000 hosts: rack0n[000-999],rack1n[000-999]"),
        "{}",
        c.summary()
    );
}

// --------------------------------------------------------------- examples

/// Copy a tree so file modes do not depend on the checkout's umask.
fn copy_tree(from: &Path, to: &Path, found: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let src = entry.path();
        let dst = to.join(entry.file_name());
        if src.is_dir() {
            fs::create_dir(&dst).unwrap();
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).unwrap();
            copy_tree(&src, &dst, found);
        } else {
            fs::copy(&src, &dst).unwrap();
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o644)).unwrap();
            if dst.extension().is_some_and(|e| e == "toml") {
                found.push(dst);
            }
        }
    }
}

/// Every `*.toml` under etc/system parses: the files directly in it as
/// whole configurations, each subdirectory as one merged directory.
#[test]
fn every_example_under_etc_system_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../etc/system");
    let d = tempdir();
    let mut found = Vec::new();
    copy_tree(&root, d.path(), &mut found);
    assert!(found.len() >= 2, "no examples under {}", root.display());
    let mut parsed = Vec::new();
    let mut fingerprints = Vec::new();
    for entry in fs::read_dir(d.path()).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() || p.extension().is_some_and(|e| e == "toml") {
            let c = Config::load(&p).unwrap_or_else(|e| panic!("{e}"));
            assert!(c.size() >= 1);
            // the example [budgets] spells out the defaults
            assert_eq!(c.budgets(), &BudgetSettings::default());
            assert_eq!(c.fingerprint().len(), 64);
            fingerprints.push((
                p.file_name().unwrap().to_owned(),
                c.fingerprint().to_string(),
            ));
            parsed.extend(c.files().iter().cloned());
        }
    }
    found.sort();
    parsed.sort();
    assert_eq!(found, parsed, "every *.toml was read by a load");
    // the single-file example and the split one describe the same cluster
    let fp = |name: &str| {
        fingerprints
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, f)| f.clone())
    };
    if let (Some(a), Some(b)) = (fp("canopy.toml"), fp("conf.d")) {
        assert_eq!(a, b, "canopy.toml and conf.d/ should be the same cluster");
    }
}

#[test]
fn untrusted_files_and_directories_are_refused() {
    let d = tempdir();
    let open = d.path().join("open");
    fs::create_dir(&open).unwrap();
    let f = write(
        &open,
        "canopy.toml",
        "[bootstrap]\nhosts = [ { host = \"a\" } ]\n",
    );
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(Config::load(&f).is_ok());
    // A directory on the path that anyone can write: the file could be
    // swapped for another.
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    let e = Config::load(&f).unwrap_err();
    assert!(matches!(e, ConfigError::Untrusted(_)), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("chmod go-w {}", open.display())),
        "{e}"
    );
    fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
    if !nix_is_root() {
        eprintln!("skipped: the other-owner case needs root");
        return;
    }
    std::os::unix::fs::chown(&f, Some(65534), None).unwrap();
    let e = Config::load(&f).unwrap_err();
    assert!(matches!(e, ConfigError::Untrusted(_)), "{e}");
    assert!(e.to_string().contains("chown"), "{e}");
    std::os::unix::fs::chown(&f, Some(0), None).unwrap();
    std::os::unix::fs::chown(&open, Some(65534), None).unwrap();
    let e = Config::load(&open).unwrap_err();
    assert!(matches!(e, ConfigError::Untrusted(_)), "{e}");
}

fn nix_is_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

// ---------------------------------------------------------------- budgets

fn with_budgets(budgets: &str) -> String {
    format!("[bootstrap]\nhosts = [ {{ host = \"a\" }} ]\n[budgets]\n{budgets}")
}

#[test]
fn budgets_default_when_absent() {
    let c = parse("[bootstrap]\nhosts = [ { host = \"a\" } ]\n");
    assert_eq!(c.budgets(), &BudgetSettings::default());
    assert_eq!(c.budgets().max_message, 16 << 20);
    assert_eq!(c.budgets().connections, 64);
}

#[test]
fn budgets_parse_integers_and_sizes() {
    let c = parse(&with_budgets(
        "max_message = 1024\nclient_bytes = \"64KiB\"\nprincipal_bytes = \"1 MiB\"\ntotal_bytes = \"1GiB\"\nconnections = 8\nin_flight = 16\nneighbour_bytes = \"2M\"\n",
    ));
    let b = c.budgets();
    assert_eq!(b.max_message, 1024);
    assert_eq!(b.client_bytes, 64 << 10);
    assert_eq!(b.principal_bytes, 1 << 20);
    assert_eq!(b.total_bytes, 1 << 30);
    assert_eq!(b.connections, 8);
    assert_eq!(b.in_flight, 16);
    assert_eq!(b.neighbour_bytes, 2 << 20);
    // one key set: the others keep their defaults
    let c = parse(&with_budgets("connections = 3\n"));
    assert_eq!(c.budgets().connections, 3);
    assert_eq!(c.budgets().max_message, 16 << 20);
}

#[test]
fn budgets_errors_name_file_line_and_key() {
    // line 4 is the first line under [budgets]
    let e = refuse(&with_budgets("max_mesage = 10\n"));
    assert!(matches!(e, ConfigError::UnknownKey { .. }), "{e}");
    assert_at(&e, "t.toml", 4, "budgets.max_mesage");
    assert!(e.to_string().contains("max_message"), "{e}");

    let e = refuse(&with_budgets("connections = 0\n"));
    assert_at(&e, "t.toml", 4, "budgets.connections");
    assert!(e.to_string().contains("out of range"), "{e}");

    let e = refuse(&with_budgets("in_flight = 1\ntotal_bytes = -5\n"));
    assert_at(&e, "t.toml", 5, "budgets.total_bytes");
    assert!(e.to_string().contains("negative"), "{e}");

    let e = refuse(&with_budgets("client_bytes = \"16MB\"\n"));
    assert_at(&e, "t.toml", 4, "budgets.client_bytes");
    assert!(e.to_string().contains("binary unit"), "{e}");

    let e = refuse(&with_budgets("connections = \"8\"\n"));
    assert_at(&e, "t.toml", 4, "budgets.connections");
    assert!(e.to_string().contains("plain integer"), "{e}");

    let e = refuse(&with_budgets("max_message = 1.5\n"));
    assert_at(&e, "t.toml", 4, "budgets.max_message");

    // over the local connector's frame limit
    let e = refuse(&with_budgets("max_message = \"65MiB\"\n"));
    assert_at(&e, "t.toml", 4, "budgets.max_message");
}

#[test]
fn budgets_must_nest() {
    // a connection must be able to hold one largest message
    let e = refuse(&with_budgets("client_bytes = 1000\nmax_message = 2000\n"));
    assert_at(&e, "t.toml", 4, "budgets.client_bytes");
    assert!(
        e.to_string()
            .contains("raise client_bytes or lower max_message"),
        "{e}"
    );
    // only max_message set: it is the one to blame
    let e = refuse(&with_budgets("max_message = \"64MiB\"\n"));
    assert_at(&e, "t.toml", 4, "budgets.max_message");
    let e = refuse(&with_budgets("principal_bytes = \"1GiB\"\n"));
    assert_at(&e, "t.toml", 4, "budgets.principal_bytes");
    assert!(e.to_string().contains("total_bytes"), "{e}");
    let e = refuse(&with_budgets("neighbour_bytes = 4096\n"));
    assert_at(&e, "t.toml", 4, "budgets.neighbour_bytes");
}

#[test]
fn budgets_set_twice_across_files_are_refused() {
    let d = tempdir();
    write(
        d.path(),
        "a.toml",
        "[bootstrap]\nhosts = [ { host = \"a\" } ]\n[budgets]\nconnections = 4\n",
    );
    write(d.path(), "b.toml", "[budgets]\nconnections = 5\n");
    let e = Config::load(d.path()).unwrap_err();
    assert!(matches!(e, ConfigError::DuplicateKey { .. }), "{e}");
    assert_eq!(e.key(), Some("budgets.connections"));
}

#[test]
fn clients_table_names_the_listening_hosts_and_refuses_bad_values() {
    let base = bootstrap("{ host = \"n[0-3]\" }");
    // Default: rank 0 listens.
    let c = parse(&format!("{base}\n[clients]\nbind = \"tcp://*:7700\"\n"));
    assert_eq!(c.client_endpoint(0).as_deref(), Some("tcp://*:7700"));
    assert_eq!(c.client_endpoint(1), None);
    // Named hosts, with %h.
    let c = parse(&format!(
        "{base}\n[clients]\nbind = \"tcp://%h:7700\"\nhosts = [\"n2\", \"n3\"]\n"
    ));
    assert_eq!(c.client_endpoint(0), None);
    assert_eq!(c.client_endpoint(3).as_deref(), Some("tcp://n3:7700"));
    assert_eq!(parse(&base).client_endpoint(0), None);
    // Bad values name the file, line and key.
    let lines = base.lines().count() as u32;
    let e = refuse(&format!("{base}\n[clients]\nbind = \"ipc:///tmp/x\"\n"));
    assert_at(&e, "t.toml", lines + 3, "clients.bind");
    let e = refuse(&format!(
        "{base}\n[clients]\nbind = \"tcp://*:7700\"\nhosts = [\"n9\"]\n"
    ));
    assert_at(&e, "t.toml", lines + 4, "clients.hosts");
    assert!(
        e.to_string().contains("n9 is not in bootstrap.hosts"),
        "{e}"
    );
    let e = refuse(&format!("{base}\n[clients]\nhosts = [\"n1\"]\n"));
    assert_eq!(e.key(), Some("clients.bind"), "{e}");
    let e = refuse(&format!(
        "{base}\n[clients]\nbind = \"tcp://*:7700\"\nport = 1\n"
    ));
    assert!(e.to_string().contains("port"), "{e}");
}
