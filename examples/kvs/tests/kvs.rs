//! `canopy-kvs` and the async client's services against a real instance
//! (`canopy start --size 4`): callers on every rank, events, the end of a
//! provider, and 64 concurrent callers.
//!
//! Needs the `canopy` binary: `cargo build -p canopy-broker` first.
#![forbid(unsafe_code)]

use canopy_client::aio::{AsyncClient, Request, ServiceError};
use canopy_client::{Client, ClientError, NODEID_ANY};
use canopy_proto::errno;
use canopy_t::{run_test, Instance, RPC_TIMEOUT};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(90);

/// A running `canopy-kvs`, killed on drop. It is in `canopy start`'s
/// process group, so the harness's watchdog kills it with the instance if
/// a test overruns; it also exits by itself when its broker goes away.
struct Kvs {
    child: Child,
}

impl Drop for Kvs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Kvs {
    /// Start `canopy-kvs` on rank `rank`'s local connector and wait for it
    /// to say it serves.
    fn start(inst: &Instance, rank: u32) -> Kvs {
        Kvs::start_with(inst, &inst.local_uri(rank), &[], rank)
    }

    /// Start it on `uri`, with extra environment; it must say it serves
    /// on rank `rank`.
    fn start_with(inst: &Instance, uri: &str, env: &[(&str, &str)], rank: u32) -> Kvs {
        let mut child = Command::new(env!("CARGO_BIN_EXE_canopy-kvs"))
            .arg("--uri")
            .arg(uri)
            .env_remove("CANOPY_URI")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .process_group(inst.pid())
            .spawn()
            .expect("cannot run canopy-kvs");
        let out = child.stdout.take().expect("piped stdout");
        let kvs = Kvs { child };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("canopy-kvs did not say it serves within 20 s");
        assert_eq!(
            line.trim(),
            format!("canopy-kvs: serving kvs on rank {rank}"),
            "canopy-kvs did not start serving"
        );
        kvs
    }
}

fn rpc(c: &mut Client, topic: &str, nodeid: u32, payload: &[u8]) -> Result<Vec<u8>, ClientError> {
    c.rpc(topic, nodeid, payload, RPC_TIMEOUT)
        .map(|m| m.payload)
}

fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(b)))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("cannot build a tokio runtime")
}

/// Rank 1 offers kvs (fanout 2: ranks 3 and 4 are its children, 2 is
/// its sibling). ANY finds it from rank 3 (upstream) but not from rank 2.
#[test]
fn kvs_serves_callers_across_the_tree() {
    run_test(LIMIT, || {
        let inst = Instance::start(4, 2, &[]);
        let kvs = Kvs::start(&inst, 1);
        let mut c0 = inst.client(0);
        let mut c2 = inst.client(2);
        let mut c3 = inst.client(3);
        c2.subscribe("kvs.changed", RPC_TIMEOUT).unwrap();

        let put = rpc(
            &mut c3,
            "kvs.put",
            NODEID_ANY,
            br#"{"key":"a","value":"1"}"#,
        )
        .expect("kvs.put from rank 3 with nodeid ANY");
        let put = json(&put);
        assert_eq!(put["key"], "a");
        assert_eq!(put["version"], 1);
        assert!(
            put["seq"].as_u64().is_some(),
            "put published no event: {put}"
        );
        assert_eq!(rpc(&mut c0, "kvs.get", 1, b"a").unwrap(), b"1");
        let m = c3.rpc("kvs.get", NODEID_ANY, b"a", RPC_TIMEOUT).unwrap();
        assert_eq!(m.header.nodeid, 1, "the answer names the provider's rank");

        // The event, published by the provider in its own namespace.
        let ev = c2.next_event(RPC_TIMEOUT).expect("kvs.changed on rank 2");
        assert_eq!(ev.header.topic, "kvs.changed");
        assert_eq!(Some(ev.header.seq), put["seq"].as_u64());
        let body = json(&ev.payload);
        assert_eq!(
            (body["key"].as_str(), body["op"].as_str()),
            (Some("a"), Some("put"))
        );
        assert!(
            body["by"].as_str().is_some_and(|p| p.starts_with("unix:")),
            "{body}"
        );

        // Errors are the service's own.
        let e = rpc(&mut c0, "kvs.get", 1, b"nope").unwrap_err();
        assert_eq!(e.errnum(), Some(errno::ENOENT), "{e}");
        assert!(e.to_string().contains("no key 'nope'"), "{e}");
        let e = rpc(&mut c0, "kvs.put", 1, b"not json").unwrap_err();
        assert_eq!(e.errnum(), Some(errno::EPROTO), "{e}");
        // An undeclared method never reaches the provider.
        let e = rpc(&mut c0, "kvs.frob", 1, b"").unwrap_err();
        assert_eq!(e.errnum(), Some(errno::ENOSYS), "{e}");
        // Rank 2 is not below rank 1: ANY finds no provider upstream.
        let e = rpc(&mut c2, "kvs.get", NODEID_ANY, b"a").unwrap_err();
        assert_eq!(e.errnum(), Some(errno::ENOSYS), "{e}");

        rpc(&mut c0, "kvs.put", 1, br#"{"key":"b","value":"2"}"#).unwrap();
        assert_eq!(
            json(&rpc(&mut c0, "kvs.keys", 1, b"").unwrap()),
            serde_json::json!(["a", "b"])
        );
        assert_eq!(rpc(&mut c3, "kvs.del", NODEID_ANY, b"a").unwrap(), b"");
        let e = rpc(&mut c0, "kvs.get", 1, b"a").unwrap_err();
        assert_eq!(e.errnum(), Some(errno::ENOENT), "{e}");
        assert_eq!(
            json(&rpc(&mut c0, "kvs.keys", 1, b"").unwrap()),
            serde_json::json!(["b"])
        );

        // service.list on rank 1 shows it, with its methods and roles.
        let list = json(&rpc(&mut c0, "service.list", 1, b"").unwrap());
        let kvs_entry = list["services"]
            .as_array()
            .and_then(|s| s.iter().find(|x| x["namespace"] == "kvs"))
            .unwrap_or_else(|| panic!("kvs missing from service.list: {list}"));
        assert_eq!(
            kvs_entry["methods"],
            serde_json::json!({"get":"user","put":"operator","del":"operator","keys":"user"})
        );
        assert_ne!(kvs_entry["provider"], "broker");

        // When the provider goes, so does the service.
        drop(kvs);
        let gone = canopy_t::wait_until(
            Duration::from_secs(10),
            || matches!(rpc(&mut c0, "kvs.get", 1, b"b"), Err(e) if e.errnum() == Some(errno::ENOSYS)),
        );
        assert!(gone, "kvs.get still answered after canopy-kvs was killed");
    });
}

/// The acceptance test: 64 callers, each on a connection of its own and
/// spread over the ranks, call at once; every call is answered correctly.
/// First `canopy-kvs` (64 puts at once, then 64 gets at once), then an
/// in-process async service whose handler holds each request until all
/// 64 have arrived: it passes only if every request is handled
/// concurrently, in a task of its own.
#[test]
fn an_async_rust_service_handles_64_concurrent_callers() {
    run_test(LIMIT, || {
        let inst = Instance::start(4, 2, &[]);
        let _kvs = Kvs::start(&inst, 1);
        let rt = runtime();
        let uris: Vec<String> = (0..4).map(|r| inst.local_uri(r)).collect();
        rt.block_on(async {
            // Callers under rank 1 (1, 3) use ANY; the others name rank 1.
            let mut callers = Vec::new();
            for i in 0..64usize {
                let rank = i % 4;
                let c = AsyncClient::connect(Some(&uris[rank])).await.unwrap();
                let target = if rank == 1 || rank == 3 {
                    NODEID_ANY
                } else {
                    1
                };
                callers.push((c, target));
            }
            let t = Duration::from_secs(20);
            let puts = callers.iter().enumerate().map(|(i, (c, target))| {
                let body = format!(r#"{{"key":"k{i}","value":"v{i}"}}"#);
                let (c, target) = (c.clone(), *target);
                async move { c.rpc_timeout("kvs.put", target, body, t).await }
            });
            for (i, r) in futures_join_all(puts).await.into_iter().enumerate() {
                let m = r.unwrap_or_else(|e| panic!("put {i}: {e}"));
                assert_eq!(json(&m.payload)["key"], format!("k{i}"));
            }
            let gets = callers.iter().enumerate().map(|(i, (c, target))| {
                let (c, target) = (c.clone(), *target);
                async move { c.rpc_timeout("kvs.get", target, format!("k{i}"), t).await }
            });
            for (i, r) in futures_join_all(gets).await.into_iter().enumerate() {
                let m = r.unwrap_or_else(|e| panic!("get {i}: {e}"));
                assert_eq!(m.payload, format!("v{i}").into_bytes(), "get {i}");
                assert_eq!(m.header.nodeid, 1);
            }
            let keys = callers[0]
                .0
                .rpc_timeout("kvs.keys", 1, "k", t)
                .await
                .unwrap();
            assert_eq!(json(&keys.payload).as_array().map(Vec::len), Some(64));

            // An in-process provider on rank 2 whose handler waits for all.
            let provider = AsyncClient::connect(Some(&uris[2])).await.unwrap();
            let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(64));
            let reg = provider
                .serve("meet", [("all", "user")], move |r: Request| {
                    let barrier = barrier.clone();
                    async move {
                        if r.payload.is_empty() {
                            return Err(ServiceError::invalid("send your number"));
                        }
                        barrier.wait().await;
                        let mut out = b"met ".to_vec();
                        out.extend_from_slice(&r.payload);
                        Ok(out)
                    }
                })
                .await
                .expect("service.add of meet on rank 2");
            assert_eq!(reg.rank, 2);
            let calls = callers.iter().enumerate().map(|(i, (c, _))| {
                let c = c.clone();
                async move { c.rpc_timeout("meet.all", 2, i.to_string(), t).await }
            });
            for (i, r) in futures_join_all(calls).await.into_iter().enumerate() {
                let m = r.unwrap_or_else(|e| panic!("meet.all {i}: {e}"));
                assert_eq!(m.payload, format!("met {i}").into_bytes());
            }
            assert_eq!(provider.unserve("meet").await.unwrap(), 0);
            let e = callers[0]
                .0
                .rpc_timeout("meet.all", 2, "1", t)
                .await
                .unwrap_err();
            assert_eq!(e.errnum(), Some(errno::ENOSYS), "{e}");
        });
    });
}

/// Await every future, concurrently, in order (no `futures` crate needed).
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    fs: impl IntoIterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("a caller task panicked"));
    }
    out
}

/// A CURVE identity for a remote client: its secret key file and principal.
fn remote_ident(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, String) {
    let kp = canopy_security::CurveKeypair::generate().unwrap();
    let key = dir.join(name);
    canopy_security::cert::write_pair(&kp, name, &key, &dir.join(format!("{name}.pub"))).unwrap();
    (key, canopy_security::curve_principal(kp.public()))
}

/// Rank 0's remote client endpoint and public key.
fn endpoint(inst: &Instance) -> (String, String) {
    let s = inst.status(0);
    (
        s["broker"]["client_endpoint"]
            .as_str()
            .expect("rank 0 has a client endpoint")
            .to_string(),
        s["broker"]["public_key"].as_str().unwrap().to_string(),
    )
}

/// The tcp side (a zmq bridge thread): many requests in flight, events,
/// and a refused key reported as a refusal.
#[test]
fn the_async_client_over_curve_keeps_requests_in_flight_and_follows_events() {
    run_test(LIMIT, || {
        let dir = tempfile::tempdir().unwrap();
        let (key, principal) = remote_ident(dir.path(), "op");
        let (stranger, _) = remote_ident(dir.path(), "stranger");
        let allow = format!("{principal}=operator");
        let inst = Instance::start(
            4,
            2,
            &["--listen-clients", "tcp://127.0.0.1:*", "--allow", &allow],
        );
        let (ep, server) = endpoint(&inst);
        let rt = runtime();
        rt.block_on(async {
            let keys = canopy_client::TcpKeys::load(&key, &server).unwrap();
            let c = AsyncClient::connect_tcp(&ep, &keys).unwrap();
            let t = Duration::from_secs(20);
            let calls = (0..64u32).map(|i| {
                let c = c.clone();
                async move { c.rpc_timeout("broker.ping", i % 4, i.to_string(), t).await }
            });
            for (i, r) in futures_join_all(calls).await.into_iter().enumerate() {
                let m = r.unwrap_or_else(|e| panic!("ping {i}: {e}"));
                assert_eq!(m.payload, i.to_string().into_bytes());
                assert_eq!(m.header.nodeid, i as u32 % 4);
            }
            let mut sub = c.subscribe("test.*").await.unwrap();
            let seq = c.publish("test.x", "hello").await.unwrap();
            let ev = tokio::time::timeout(t, sub.next()).await.unwrap().unwrap();
            assert_eq!(
                (
                    ev.header.topic.as_str(),
                    ev.header.seq,
                    ev.payload.as_slice()
                ),
                ("test.x", seq, &b"hello"[..])
            );

            let keys = canopy_client::TcpKeys::load(&stranger, &server).unwrap();
            let s = AsyncClient::connect_tcp(&ep, &keys).unwrap();
            let e = s.rpc_timeout("broker.ping", 0, "x", t).await.unwrap_err();
            assert!(matches!(e, ClientError::Refused(_)), "{e}");
        });
    });
}

/// `canopy-kvs` as a remote provider over CURVE, allowed by a policy rule
/// with `register = ["kvs"]`; a local caller reaches it through rank 0.
/// Without the grant, the same provider is refused (EPERM).
#[test]
fn kvs_serves_from_a_remote_client_over_curve() {
    run_test(LIMIT, || {
        let dir = tempfile::tempdir().unwrap();
        let (key, principal) = remote_ident(dir.path(), "provider");
        let (other_key, other) = remote_ident(dir.path(), "other");
        let (guest_key, guest) = remote_ident(dir.path(), "guest");
        let policy = dir.path().join("policy.toml");
        std::fs::write(
            &policy,
            format!(
                "[[rule]]\nname = \"provider\"\nprincipal = \"{principal}\"\nroles = [\"operator\"]\n\n\
                 [[rule]]\nname = \"provider-offers-kvs\"\nprincipal = \"{principal}\"\nregister = [\"kvs\"]\n\n\
                 [[rule]]\nname = \"other\"\nprincipal = \"{other}\"\nroles = [\"operator\"]\n\n\
                 [[rule]]\nname = \"guest\"\nprincipal = \"{guest}\"\nroles = [\"user\"]\n"
            ),
        )
        .unwrap();
        let inst = Instance::start(
            2,
            2,
            &[
                "--listen-clients",
                "tcp://127.0.0.1:*",
                "--policy",
                policy.to_str().unwrap(),
            ],
        );
        let (ep, server) = endpoint(&inst);
        // Admitted, but not granted kvs: refused, and canopy-kvs says so.
        let out = canopy_t::run_command(
            Command::new(env!("CARGO_BIN_EXE_canopy-kvs"))
                .arg("--uri")
                .arg(&ep)
                .env("CANOPY_KEY", &other_key)
                .env("CANOPY_SERVER_KEY", &server),
            Duration::from_secs(20),
        );
        let err = canopy_t::text(&out.stderr);
        assert!(!out.status.success(), "canopy-kvs without a grant: {err}");
        assert!(
            err.contains("cannot offer namespace kvs") && err.contains("EPERM"),
            "{err}"
        );
        let key = key.to_str().unwrap().to_string();
        let _kvs = Kvs::start_with(
            &inst,
            &ep,
            &[("CANOPY_KEY", &key), ("CANOPY_SERVER_KEY", &server)],
            0,
        );
        let mut c1 = inst.client(1);
        rpc(
            &mut c1,
            "kvs.put",
            NODEID_ANY,
            br#"{"key":"r","value":"remote"}"#,
        )
        .expect("kvs.put from rank 1 reaches the remote provider on rank 0");
        let m = c1.rpc("kvs.get", 0, b"r", RPC_TIMEOUT).unwrap();
        assert_eq!((m.payload.as_slice(), m.header.nodeid), (&b"remote"[..], 0));

        // A remote guest (role user) may get but not put: the roles the
        // provider declared are checked before it sees the request.
        let keys = canopy_client::TcpKeys::load(&guest_key, &server).unwrap();
        let mut g = Client::connect_tcp(&ep, &keys).unwrap();
        assert_eq!(rpc(&mut g, "kvs.get", 0, b"r").unwrap(), b"remote");
        let e = rpc(&mut g, "kvs.put", 0, br#"{"key":"r","value":"x"}"#).unwrap_err();
        assert_eq!(e.errnum(), Some(errno::EPERM), "{e}");
        assert!(e.to_string().contains("operator"), "{e}");
        assert_eq!(rpc(&mut c1, "kvs.get", 0, b"r").unwrap(), b"remote");
    });
}
