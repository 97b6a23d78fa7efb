//! The async client against a fake broker on a socketpair: matching,
//! delivery, NORESPONSE, service.error, events and the end of a
//! connection, without a real broker.

use super::*;
use canopy_proto::frame::encode_frame;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

/// The broker's end of the socketpair.
struct FakeBroker {
    s: UnixStream,
    d: FrameDecoder,
}

const T: Duration = Duration::from_secs(5);

impl FakeBroker {
    async fn recv(&mut self) -> (Header, Vec<u8>) {
        tokio::time::timeout(T, self.recv_inner())
            .await
            .expect("the client sent nothing within 5 s")
    }

    async fn recv_inner(&mut self) -> (Header, Vec<u8>) {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(f) = self.d.next_frame().unwrap() {
                return f;
            }
            let n = self.s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the client closed the connection");
            self.d.push(&buf[..n]);
        }
    }

    /// Nothing more arrives within `d`.
    async fn quiet(&mut self, d: Duration) {
        if let Ok((h, _)) = tokio::time::timeout(d, self.recv_inner()).await {
            panic!("unexpected frame from the client: {h:?}");
        }
    }

    async fn send(&mut self, h: &Header, payload: &[u8]) {
        let mut out = Vec::new();
        encode_frame(h, payload, &mut out).unwrap();
        self.s.write_all(&out).await.unwrap();
    }

    /// Answer the request `req` with `errnum` and `payload`.
    async fn answer(&mut self, req: &Header, errnum: u32, payload: &[u8]) {
        self.send(&req.response(3, errnum), payload).await;
    }

    /// Deliver a request for a client's service.
    async fn deliver(&mut self, topic: &str, token: u32, flags: u8, payload: &[u8]) {
        let mut h = Header::request(topic, 3, token);
        h.flags = flags;
        h.userid = "unix:alice".into();
        h.roles = Roles::USER;
        self.send(&h, payload).await;
    }
}

fn pair() -> (AsyncClient, FakeBroker) {
    let (a, b) = UnixStream::pair().unwrap();
    (
        AsyncClient::from_unix(a),
        FakeBroker {
            s: b,
            d: FrameDecoder::new(),
        },
    )
}

#[test]
fn patterns() {
    assert!(pattern_matches("*", "a.b"));
    assert!(pattern_matches("job.*", "job.start"));
    assert!(pattern_matches("job*", "jobs"));
    assert!(!pattern_matches("job.*", "jobs"));
    assert!(pattern_matches("kvs.changed", "kvs.changed"));
    assert!(!pattern_matches("kvs.changed", "kvs.changed2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rpcs_are_matched_by_matchtag() {
    let (c, mut b) = pair();
    let mut calls = Vec::new();
    for i in 0..32u32 {
        let c = c.clone();
        calls.push(tokio::spawn(async move {
            c.rpc("broker.ping", 3, i.to_string()).await
        }));
    }
    let mut reqs = Vec::new();
    for _ in 0..32 {
        reqs.push(b.recv().await);
    }
    let tags: std::collections::HashSet<u32> = reqs.iter().map(|(h, _)| h.matchtag).collect();
    assert_eq!(tags.len(), 32, "matchtags must be distinct");
    assert!(!tags.contains(&0), "matchtag 0 is reserved for refusals");
    // Answered in reverse order; request "7" fails.
    for (h, p) in reqs.iter().rev() {
        assert_eq!(h.msg_type, MsgType::Request);
        assert_eq!(h.topic, "broker.ping");
        if p == b"7" {
            b.answer(h, errno::EPERM, b"needs admin").await;
        } else {
            b.answer(h, 0, p).await;
        }
    }
    for (i, call) in calls.into_iter().enumerate() {
        let r = call.await.unwrap();
        if i == 7 {
            let e = r.unwrap_err();
            assert_eq!(e.errnum(), Some(errno::EPERM));
            assert!(e.to_string().contains("needs admin"), "{e}");
        } else {
            assert_eq!(r.unwrap().payload, i.to_string().into_bytes());
        }
    }
}

#[tokio::test]
async fn a_timed_out_rpc_is_forgotten_and_a_late_answer_ignored() {
    let (c, mut b) = pair();
    let e = c
        .rpc_timeout("broker.ping", 3, "x", Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Timeout(_)), "{e}");
    let (h, _) = b.recv().await;
    assert!(lock(&c.inner.state).pending.is_empty());
    b.answer(&h, 0, b"late").await;
    let call = tokio::spawn({
        let c = c.clone();
        async move { c.rpc("broker.ping", 3, "y").await }
    });
    let (h2, p2) = b.recv().await;
    assert_ne!(h2.matchtag, h.matchtag);
    b.answer(&h2, 0, &p2).await;
    assert_eq!(call.await.unwrap().unwrap().payload, b"y");
}

#[tokio::test]
async fn service_error_is_a_notice_not_the_answer_to_a_request() {
    let (c, mut b) = pair();
    let mut notices = c.service_notices().expect("first call takes the receiver");
    assert!(c.service_notices().is_none());
    let call = tokio::spawn({
        let c = c.clone();
        async move { c.rpc("kvs.get", NODEID_ANY, "k").await }
    });
    let (h, _) = b.recv().await;
    // A service.error whose stray token equals our request's matchtag.
    let mut se = h.response(3, errno::ENOENT);
    se.topic = SERVICE_ERROR_TOPIC.into();
    b.send(&se, b"token was never delivered to this connection")
        .await;
    let n = tokio::time::timeout(T, notices.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        n,
        ServiceNotice {
            token: h.matchtag,
            errnum: errno::ENOENT,
            message: "token was never delivered to this connection".into()
        }
    );
    assert!(
        !call.is_finished(),
        "a service.error must not answer our rpc"
    );
    // The broker's control messages (service.probe) are ignored.
    b.send(&Header::control("service.probe"), b"").await;
    // A stray token 0 is not a refusal either.
    se.matchtag = 0;
    b.send(&se, b"token 0").await;
    assert_eq!(notices.recv().await.unwrap().token, 0);
    assert!(!c.is_closed());
    b.answer(&h, 0, b"v").await;
    assert_eq!(call.await.unwrap().unwrap().payload, b"v");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_namespace_answers_deliveries() {
    let (c, mut b) = pair();
    let reg = tokio::spawn({
        let c = c.clone();
        async move {
            c.serve(
                "kvs",
                [("get", "user"), ("put", "operator"), ("boom", "user")],
                |r: Request| async move {
                    match r.method.as_str() {
                        "get" => {
                            // The slow one: answers after later ones.
                            if r.payload == b"slow" {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            Ok(format!("{}|{}|{}", r.principal, r.roles.0, r.rank).into_bytes())
                        }
                        "put" => Err(ServiceError::invalid("put needs KEY=VALUE")),
                        "boom" => panic!("handler bug"),
                        _ => Err(ServiceError::new(errno::ENOSYS, "no such method")),
                    }
                },
            )
            .await
        }
    });
    let (h, p) = b.recv().await;
    assert_eq!((h.topic.as_str(), h.nodeid), ("service.add", NODEID_ANY));
    let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"namespace":"kvs","methods":{"get":"user","put":"operator","boom":"user"}})
    );
    b.answer(&h, 0, br#"{"namespace":"kvs","rank":3}"#).await;
    let r = reg.await.unwrap().unwrap();
    assert_eq!(
        r,
        Registration {
            namespace: "kvs".into(),
            rank: 3
        }
    );

    b.deliver("kvs.get", 7, 0, b"slow").await;
    b.deliver("kvs.get", 8, FLAG_NORESPONSE, b"x").await;
    b.deliver("kvs.put", 9, 0, b"x").await;
    b.deliver("kvs.boom", 10, 0, b"").await;
    b.deliver("other.get", 11, 0, b"").await;
    b.deliver("kvs.get", 12, 0, b"fast").await;
    let mut got = HashMap::new();
    for _ in 0..5 {
        let (h, p) = b.recv().await;
        assert_eq!(h.msg_type, MsgType::Response);
        assert!(
            got.insert(h.matchtag, (h.errnum, String::from_utf8(p).unwrap()))
                .is_none(),
            "token {} answered twice",
            h.matchtag
        );
    }
    // NORESPONSE (8) is not answered.
    b.quiet(Duration::from_millis(200)).await;
    assert_eq!(got[&7], (0, "unix:alice|16|3".into()));
    assert_eq!(got[&12], (0, "unix:alice|16|3".into()));
    assert_eq!(got[&9], (errno::EINVAL, "put needs KEY=VALUE".into()));
    assert_eq!(got[&10].0, EIO);
    assert!(got[&10].1.contains("handler failed"), "{}", got[&10].1);
    assert_eq!(got[&11].0, errno::ENOSYS);
    assert!(!got.contains_key(&8));
}

#[tokio::test]
async fn a_refused_service_add_uninstalls_the_handler() {
    let (c, mut b) = pair();
    let reg = tokio::spawn({
        let c = c.clone();
        async move {
            c.serve("broker", [("x", "user")], |_r: Request| async {
                Ok(Vec::new())
            })
            .await
        }
    });
    let (h, _) = b.recv().await;
    b.answer(&h, errno::EPERM, b"broker is a reserved namespace")
        .await;
    let e = reg.await.unwrap().unwrap_err();
    assert_eq!(e.errnum(), Some(errno::EPERM));
    assert!(lock(&c.inner.services).is_empty());
    // A delivery for it now gets ENOSYS.
    b.deliver("broker.x", 5, 0, b"").await;
    let (h, _) = b.recv().await;
    assert_eq!((h.matchtag, h.errnum), (5, errno::ENOSYS));
}

#[tokio::test]
async fn events_go_to_matching_subscriptions() {
    let (c, mut b) = pair();
    let s1 = tokio::spawn({
        let c = c.clone();
        async move { c.subscribe("kvs.*").await }
    });
    let (h, p) = b.recv().await;
    assert_eq!(
        (h.topic.as_str(), p.as_slice()),
        ("event.subscribe", &b"kvs.*"[..])
    );
    b.answer(&h, 0, b"").await;
    let mut s1 = s1.await.unwrap().unwrap();
    let s2 = tokio::spawn({
        let c = c.clone();
        async move { c.subscribe("*").await }
    });
    let (h, _) = b.recv().await;
    b.answer(&h, 0, b"").await;
    let mut s2 = s2.await.unwrap().unwrap();

    b.send(&Header::event("kvs.changed", 1), b"a").await;
    b.send(&Header::event("job.start", 2), b"b").await;
    b.send(&Header::event("kvs.changed", 3), b"c").await;
    let e = s1.next().await.unwrap();
    assert_eq!((e.header.seq, e.payload.as_slice()), (1, &b"a"[..]));
    assert_eq!(s1.next().await.unwrap().header.seq, 3);
    let seqs: Vec<u64> = [
        s2.next().await.unwrap(),
        s2.next().await.unwrap(),
        s2.next().await.unwrap(),
    ]
    .iter()
    .map(|m| m.header.seq)
    .collect();
    assert_eq!(seqs, [1, 2, 3]);
    // Dropping a subscription unsubscribes its pattern.
    drop(s1);
    let (h, p) = b.recv().await;
    assert_eq!(
        (h.topic.as_str(), p.as_slice()),
        ("event.unsubscribe", &b"kvs.*"[..])
    );
    // Its answer, even an error, is not a refusal (matchtag 0).
    assert_ne!(h.matchtag, 0);
    b.answer(&h, errno::EPROTO, b"no such subscription").await;
    let call = tokio::spawn({
        let c = c.clone();
        async move { c.rpc("broker.ping", 0, "after").await }
    });
    let (h, p) = b.recv().await;
    b.answer(&h, 0, &p).await;
    assert_eq!(call.await.unwrap().unwrap().payload, b"after");
    assert!(!c.is_closed());
    // The end of the connection ends the stream.
    drop(b);
    assert!(tokio::time::timeout(T, s2.next()).await.unwrap().is_none());
}

#[tokio::test]
async fn the_end_of_the_connection_fails_what_waits() {
    let (c, mut b) = pair();
    let call = tokio::spawn({
        let c = c.clone();
        async move { c.rpc("broker.ping", 0, "x").await }
    });
    b.recv().await;
    drop(b);
    let e = tokio::time::timeout(T, call)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, ClientError::Closed), "{e}");
    assert!(matches!(c.closed().await, ClientError::Closed));
    assert!(matches!(
        c.rpc("broker.ping", 0, "y").await,
        Err(ClientError::Closed)
    ));
}

#[tokio::test]
async fn a_refusal_frame_is_reported_as_refused() {
    let (c, mut b) = pair();
    let call = tokio::spawn({
        let c = c.clone();
        async move { c.rpc("broker.ping", 0, "x").await }
    });
    b.recv().await;
    let mut h = Header::request("connect", 0, 0);
    h.msg_type = MsgType::Response;
    h.errnum = errno::EPERM;
    b.send(&h, b"permission denied: not the owner").await;
    let e = tokio::time::timeout(T, call)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Refused(m) if m.contains("not the owner")),
        "{e}"
    );
}

/// Frames larger than the socket takes at once are finished by the
/// flusher task, in order, from requests and from answers alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_frames_are_written_whole_when_the_socket_is_full() {
    let (c, mut b) = pair();
    let big: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 251) as u8).collect();
    let reg = tokio::spawn({
        let c = c.clone();
        async move {
            c.serve("big", [("get", "user")], |r: Request| async move {
                let n: usize = String::from_utf8(r.payload).unwrap().parse().unwrap();
                Ok((0..n as u32).map(|i| (i % 251) as u8).collect())
            })
            .await
        }
    });
    let (h, _) = b.recv().await;
    b.answer(&h, 0, br#"{"namespace":"big","rank":3}"#).await;
    reg.await.unwrap().unwrap();
    // Two big answers and a big request, while the broker is not reading.
    b.deliver("big.get", 1, 0, (8u32 << 20).to_string().as_bytes())
        .await;
    b.deliver("big.get", 2, 0, b"3").await;
    let call = tokio::spawn({
        let (c, big) = (c.clone(), big.clone());
        async move { c.rpc("broker.ping", 3, big).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut got = HashMap::new();
    for _ in 0..3 {
        let (h, p) = b.recv().await;
        match h.msg_type {
            MsgType::Response => {
                got.insert(h.matchtag, p);
            }
            MsgType::Request => {
                assert_eq!(p, big, "the request's payload arrived intact");
                b.answer(&h, 0, b"ok").await;
            }
            t => panic!("unexpected {t:?}"),
        }
    }
    assert_eq!(got[&1], big);
    assert_eq!(got[&2], vec![0, 1, 2]);
    assert_eq!(call.await.unwrap().unwrap().payload, b"ok");
}
