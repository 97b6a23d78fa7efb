//! The gssapi mechanism against a real MIT KDC (a throwaway realm per test,
//! see `canopy_t::krb`): Kerberos binds each link's CURVE key to a
//! principal, CURVE carries the traffic. When the KDC tools are not
//! installed, every test here prints "skipped: ..." and passes.
#![forbid(unsafe_code)]

use canopy_t::krb::{missing_tools, Realm, RealmOpts};
use canopy_t::{run_canopy, run_test, text, Instance};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(90);

fn skip() -> bool {
    match missing_tools() {
        Some(why) => {
            println!("skipped: {why}");
            true
        }
        None => false,
    }
}

fn env_ref(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// `export NAME=VALUE` printed by `canopy start`.
fn exported(inst: &Instance, name: &str) -> String {
    let prefix = format!("export {name}=");
    inst.stdout_text()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
        .unwrap_or_else(|| panic!("canopy start printed no {name}:\n{}", inst.stdout_text()))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A user instance of `size` brokers over gssapi, as `alice`, with a
/// remote client endpoint. Returns the instance and the client endpoint.
fn alice_instance(realm: &Realm, size: u32, extra: &[&str]) -> (Instance, String) {
    let ep = format!("tcp://127.0.0.1:{}", free_port());
    let mut args = vec!["--mechanism", "gssapi", "--listen-clients", &ep];
    args.extend_from_slice(extra);
    let env = realm.env("alice");
    let inst = Instance::start_with_env(size, 2, &args, &env_ref(&env));
    (inst, ep)
}

/// `canopy ping` over tcp with Kerberos, as `who`.
fn remote_ping(
    realm: &Realm,
    inst: &Instance,
    ep: &str,
    who: &str,
    rank: u32,
) -> std::process::Output {
    let env = realm.env(who);
    let mut e = env_ref(&env);
    let kex = exported(inst, "CANOPY_KEX");
    let target = exported(inst, "CANOPY_GSS_TARGET");
    e.push(("CANOPY_KEX", &kex));
    e.push(("CANOPY_GSS_TARGET", &target));
    let rank = rank.to_string();
    run_canopy(
        &["ping", "--uri", ep, "--rank", &rank, "--count", "2"],
        &e,
        Duration::from_secs(30),
    )
}

#[test]
fn an_8_broker_user_instance_comes_up_and_allowed_clients_ping() {
    if skip() {
        return;
    }
    run_test(LIMIT, || {
        let realm = Realm::start(&["alice", "bob", "carol"]);
        let t0 = Instant::now();
        let bob = realm.principal("bob");
        let allow = format!("{bob}=user");
        let (inst, ep) = alice_instance(&realm, 8, &["--allow", &allow]);
        println!("8 brokers up over gssapi in {:?}", t0.elapsed());
        inst.assert_all_ranks_answer();
        // Every link was bound through Kerberos, as alice.
        let st = inst.stderr_text();
        assert!(
            !st.contains("verdict=deny"),
            "a denial while starting:\n{st}"
        );

        // The owner and an allowed principal can ping any rank.
        for who in ["alice", "bob"] {
            let out = remote_ping(&realm, &inst, &ep, who, 7);
            assert!(
                out.status.success(),
                "{who} could not ping: {}\n{}",
                text(&out.stdout),
                text(&out.stderr)
            );
        }
        // A principal the ACL does not name gets nothing.
        let out = remote_ping(&realm, &inst, &ep, "carol", 0);
        assert!(!out.status.success(), "carol got in: {}", text(&out.stdout));
        let err = text(&out.stderr);
        assert!(
            err.contains("refused") || err.contains("denied"),
            "carol's error: {err}"
        );
        assert!(
            !text(&out.stdout).contains("bytes from"),
            "carol got a reply"
        );
        let denied = inst
            .wait_log_line(
                &["verdict=deny", "carol@CANOPY.TEST"],
                Duration::from_secs(5),
            )
            .unwrap_or_else(|| panic!("no denial logged for carol:\n{}", inst.stderr_text()));
        println!("{denied}");
        inst.assert_all_ranks_answer();
    });
}
