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
fn exec_drop_in_lets_only_the_setuid_helper_gain_root() {
    let text = std::fs::read_to_string(etc().join("canopy.service.d/exec.conf")).unwrap();
    let unit = parse_unit(&text).unwrap();
    assert_eq!(unit.keys().collect::<Vec<_>>(), ["Service"]);
    let svc = &unit["Service"];
    let one = |k: &str| svc.get(k).and_then(|v| v.last()).map(String::as_str);
    assert_eq!(one("NoNewPrivileges"), Some("no"));
    assert_eq!(one("RestrictSUIDSGID"), Some("no"));
    let mut caps: Vec<&str> = one("CapabilityBoundingSet")
        .unwrap()
        .split_whitespace()
        .collect();
    caps.sort();
    assert_eq!(caps, ["CAP_KILL", "CAP_SETGID", "CAP_SETUID"]);
    // The broker stays the unit's user; the drop-in changes no identity.
    for k in ["User", "Group", "ExecStart", "AmbientCapabilities"] {
        assert!(one(k).is_none(), "{k} must stay as the unit says");
    }
}

#[test]
fn no_file_in_etc_goes_unparsed() {
    // Files parsed elsewhere: etc/policy.toml (canopy-acl tests),
    // etc/system/** (canopy-config tests), etc/imp.toml (canopy-imp
    // tests), etc/ca.toml (canopy-ca tests), etc/canopy.service and
    // etc/canopy.service.d/exec.conf (above).
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
                || rel == "canopy.service.d/exec.conf"
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

/// A sandbox like the unit's `RestrictAddressFamilies=`: a seccomp filter
/// that fails `socket(2)` with EAFNOSUPPORT (as systemd does) for any
/// family not listed, then runs the command. Built with the system's C
/// compiler into `dir`.
fn family_filter(dir: &std::path::Path) -> std::path::PathBuf {
    let src = dir.join("famfilter.c");
    std::fs::write(
        &src,
        r#"#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: famfilter FAMILY,... COMMAND...\n"); return 64; }
    struct sock_filter f[80]; int i = 0, n = 0;
    f[i++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
    f[i++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_socket, 1, 0);
    f[i++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    f[i++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0]));
    for (char *t = strtok(argv[1], ","); t && n < 32; t = strtok(NULL, ","), n++) {
        f[i++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)atoi(t), 0, 1);
        f[i++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    }
    f[i++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EAFNOSUPPORT & SECCOMP_RET_DATA));
    struct sock_fprog prog = { .len = (unsigned short)i, .filter = f };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) {
        perror("famfilter: seccomp"); return 1;
    }
    execvp(argv[2], argv + 2);
    perror("famfilter: exec"); return 127;
}
"#,
    )
    .unwrap();
    let bin = dir.join("famfilter");
    let out = std::process::Command::new("cc")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("run cc (scripts/deps.sh installs build-essential)");
    assert!(
        out.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

/// Issue 15 #2: the shipped unit's `RestrictAddressFamilies=` must let
/// libzmq resolve interface names (`tcp://eth0:%p`, as the shipped example
/// config binds), which takes a netlink socket. Brokers binding an
/// interface name come up under exactly the unit's families, and do not
/// without AF_NETLINK (so the filter is real and the test can fail).
#[test]
fn the_units_address_families_let_brokers_bind_interface_names() {
    use canopy_t::cluster::Cluster;
    use std::time::Duration;
    canopy_t::run_test(Duration::from_secs(60), || {
        let text = std::fs::read_to_string(etc().join("canopy.service")).unwrap();
        let unit = parse_unit(&text).unwrap();
        let fams = unit["Service"]["RestrictAddressFamilies"]
            .last()
            .expect("the unit restricts address families")
            .clone();
        let number = |f: &str| match f {
            "AF_UNIX" => 1,
            "AF_INET" => 2,
            "AF_INET6" => 10,
            "AF_NETLINK" => 16,
            other => panic!("the test does not know address family {other}"),
        };
        let shipped: Vec<u32> = fams.split_whitespace().map(number).collect();
        assert!(
            shipped.contains(&16),
            "the unit must allow AF_NETLINK: {fams}"
        );
        let dir = tempfile::tempdir().unwrap();
        let filter = family_filter(dir.path());
        let run = |families: &[u32]| -> Cluster {
            let mut c = Cluster::new(3);
            let hosts = c.hosts_binding(3, "tcp://lo:%p");
            c.write("canopy.toml", &c.config_text(&hosts));
            let list: Vec<String> = families.iter().map(u32::to_string).collect();
            c.set_wrapper(vec![filter.clone().into(), list.join(",").into()]);
            c.start_all();
            c
        };
        let c = run(&shipped);
        c.wait_full(Duration::from_secs(15));
        c.assert_all_answer();
        drop(c);
        let without: Vec<u32> = shipped.iter().copied().filter(|f| *f != 16).collect();
        let c = run(&without);
        assert!(
            !canopy_t::wait_until(Duration::from_secs(4), || c
                .status(0)
                .is_some_and(|s| s["health"] == "full")),
            "brokers binding an interface name came up without AF_NETLINK: the filter was not applied"
        );
    });
}
