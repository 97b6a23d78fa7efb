//! The example ca.toml shipped in etc/ parses and means what its comments
//! say.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use canopy_ca::CaConfig;
use canopy_imp::config::MAX_LIFETIME;

#[test]
fn etc_ca_toml_parses_and_matches_its_comments() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../etc/ca.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    // parse, not load: a checkout's owner and modes are not an install's.
    let c = CaConfig::parse(&text, &path.display().to_string()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.secret_key, PathBuf::from("/etc/canopy/ca/ca.key"));
    assert_eq!(c.lifetime, MAX_LIFETIME);
    assert_eq!(c.namespace, "ca");
    assert!(c.realms.contains("HPC.EXAMPLE") && c.realms.len() == 1);
    assert_eq!(
        canopy_ca::map_principal("alice@HPC.EXAMPLE", &c.realms),
        Ok("alice".to_string())
    );
    assert!(canopy_ca::map_principal("alice@ELSEWHERE", &c.realms).is_err());

    // A lifetime above the cap is refused with file:line:col.
    let long = text.replace("lifetime = 3600", "lifetime = 86400");
    let err = CaConfig::parse(&long, "ca.toml").unwrap_err().to_string();
    let line = text
        .lines()
        .position(|l| l.starts_with("lifetime ="))
        .unwrap()
        + 1;
    assert!(
        err.starts_with(&format!(
            "ca.toml:{line}:12: lifetime: 86400 is out of range"
        )),
        "{err}"
    );
}
