//! Entry point of the `config` fuzz target in `fuzz/` (see
//! docs/security.md, "Fuzzing"). Never panics on hostile bytes; panics only
//! when a property of the parser or of the resolution is violated.

use crate::{hostlist, Config};

/// Most ranks whose resolution is checked per input (a configuration may
/// name up to a million hosts).
const RANKS_CHECKED: u32 = 64;

/// Config parser. The input (as text, lossily) is parsed as a
/// configuration; whatever parses must resolve every rank checked to a
/// host that maps back to the same rank, a consistent tree, and endpoints.
/// Every line is also tried as a hostlist: what expands must have the
/// count [`hostlist::count`] gives and survive compression.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        let Ok(hosts) = hostlist::expand(line) else {
            continue;
        };
        assert_eq!(
            hostlist::count(line).ok(),
            Some(hosts.len()),
            "count of {line:?}"
        );
        if hosts.len() <= 10_000 {
            let short = hostlist::compress(&hosts);
            assert_eq!(
                hostlist::expand(&short).ok().as_ref(),
                Some(&hosts),
                "{line:?} compressed to {short:?}"
            );
        }
    }

    let Ok(config) = Config::parse(&text, "fuzz.toml") else {
        return;
    };
    let size = config.size();
    assert!(size >= 1, "a configuration has at least one host");
    assert_eq!(config.hosts().len(), size as usize);
    let tree = config.topology();
    assert_eq!(tree.size(), size);
    assert_eq!(tree.parent(0), None, "rank 0 is the root");
    for rank in 0..size.min(RANKS_CHECKED) {
        let host = config.host(rank).expect("every rank has a host");
        assert_eq!(config.rank_of(host), Some(rank), "rank of {host}");
        assert!(config.bind_endpoint(rank).is_some());
        assert!(config.connect_endpoint(rank).is_some());
        let _ = config.cert_path(rank);
        let _ = config.public_cert_path(rank);
        if rank > 0 {
            let parent = tree.parent(rank).expect("every rank but 0 has a parent");
            assert!(parent < size);
            assert!(tree.children(parent).contains(&rank), "{parent} -> {rank}");
        }
        assert!(tree.depth(rank) < size, "depth of {rank}");
        for &child in tree.children(rank) {
            assert_eq!(tree.parent(child), Some(rank), "{rank} <- {child}");
        }
    }
    assert_eq!(config.host(size), None);
    if size <= 10_000 {
        assert!(tree.height() < size);
        tree.to_overlay()
            .expect("a valid configuration has a valid overlay topology");
        let _ = config.summary();
    }
    let again = Config::parse(&text, "fuzz.toml").expect("parses the same way twice");
    assert_eq!(again.fingerprint(), config.fingerprint());
}
