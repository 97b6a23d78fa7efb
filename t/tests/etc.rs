//! Every file in etc/ is parsed by a test: the TOML files by their own
//! crates' tests (etc/policy.toml by canopy-acl, etc/system/ by
//! canopy-config), the systemd unit here. This test also fails if a file
//! appears in etc/ that no test parses.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn etc() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../etc")
}

/// A systemd unit as section -> key -> values, refusing malformed lines.
fn parse_unit(text: &str) -> Result<BTreeMap<String, BTreeMap<String, Vec<String>>>, String> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut section = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(s.to_string());
            out.entry(s.to_string()).or_default();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: not KEY=VALUE: {line}", i + 1))?;
        let s = section
            .as_ref()
            .ok_or_else(|| format!("line {}: outside any section", i + 1))?;
        out.get_mut(s)
            .expect("section exists")
            .entry(k.trim().to_string())
            .or_default()
            .push(v.trim().to_string());
    }
    Ok(out)
}

#[test]
fn systemd_unit_is_hardened_and_uses_notify() {
    let text = std::fs::read_to_string(etc().join("canopy.service")).unwrap();
    let unit = parse_unit(&text).unwrap();
    let svc = &unit["Service"];
    let one = |k: &str| {
        svc.get(k)
            .and_then(|v| v.last())
            .map(String::as_str)
            .unwrap_or_else(|| panic!("[Service] {k} missing"))
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("PrivateTmp"), "yes");
    assert_eq!(one("User"), "canopy");
    assert_ne!(one("User"), "root");
    assert!(one("ExecStart").contains("broker --config"));
    assert!(!one("ExecStart").contains("--force-root"));
    assert!(unit.contains_key("Install"));
}

#[test]
fn no_file_in_etc_goes_unparsed() {
    // Files parsed elsewhere: etc/policy.toml (canopy-acl tests),
    // etc/system/** (canopy-config tests), etc/canopy.service (above).
    let mut stack = vec![etc()];
    let mut unparsed = Vec::new();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = p
                .strip_prefix(etc())
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let covered = rel == "canopy.service"
                || (rel.starts_with("system/") && rel.ends_with(".toml"))
                || (!rel.contains('/') && rel.ends_with(".toml"));
            if !covered {
                unparsed.push(rel);
            }
        }
    }
    assert!(
        unparsed.is_empty(),
        "files in etc/ that no test parses: {unparsed:?}"
    );
}
