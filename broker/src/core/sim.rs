//! A deterministic, in-memory network of [`BrokerCore`]s on a simulated
//! clock: no sockets, no threads, no root. Connections are modelled by
//! routing ids; a cut link makes sends on it fail as libzmq's would
//! (`ChildGone` / `ParentGone`); the admission worker is a policy function
//! with a simulated delay.

use super::*;
use canopy_security::curve_principal;
use std::collections::BTreeMap;

pub type Policy = Box<dyn Fn(&Subject) -> Result<(String, Grant), (String, String)>>;

pub const OWNER_UID: u32 = 1000;

/// What a simulated client received.
#[derive(Debug, Clone)]
pub struct Got {
    pub header: Header,
    pub payload: Vec<u8>,
}

pub struct Node {
    pub core: BrokerCore<Vec<u8>>,
    pub key: [u8; 32],
    /// The identity of this node's current connection to its parent, and
    /// the key that connection authenticated with.
    pub conn: Option<Vec<u8>>,
    pub conn_key: [u8; 32],
    pub exit: Option<Exit>,
    pub rebinds: usize,
    pub next_key: Option<[u8; 32]>,
    pub ring: Option<KeyRing>,
    /// `exec.run` commands started here, signals and stdin sent to them.
    pub spawned: Vec<exec::Spawn>,
    pub signals: Vec<(u64, i32)>,
    pub stdin: Vec<(u64, Vec<u8>)>,
}

enum Delivery {
    Input(u32, Input<Vec<u8>>),
}

pub struct Sim {
    pub now: u64,
    pub nodes: Vec<Node>,
    pub topo: Topology,
    /// Links cut: (child rank), both directions fail.
    pub cut: std::collections::HashSet<u32>,
    /// Messages to a rank held (not delivered) while set.
    pub stalled: std::collections::HashSet<u32>,
    stalled_queue: Vec<Delivery>,
    queue: VecDeque<Delivery>,
    /// (rank, client id) -> what it received; closed clients.
    pub inbox: BTreeMap<(u32, u32), Vec<Got>>,
    pub closed: std::collections::HashSet<(u32, u32)>,
    /// What remote clients received, by routing id.
    pub remote_inbox: Vec<(Vec<u8>, Got)>,
    pub policy: Policy,
    /// How long the simulated admission worker takes.
    pub decide_ms: u64,
    jobs: Vec<(u64, u32, Done)>,
    pub reloads: usize,
    tag: u32,
}

pub fn timing() -> Timing {
    Timing {
        heartbeat_ms: 100,
        torpid_ms: 500,
        lost_ms: 1500,
    }
}

fn key_of(rank: u32) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[0] = rank as u8 + 1;
    k[1] = 0x5a;
    k
}

impl Sim {
    /// `size` brokers in a `fanout`-ary tree, owner only.
    pub fn new(size: u32, fanout: u32) -> Sim {
        Sim::with_budgets(size, fanout, Budgets::default())
    }

    /// The same, with these budgets on every broker.
    pub fn with_budgets(size: u32, fanout: u32, budgets: Budgets) -> Sim {
        let mut sim = Sim::unsettled(size, fanout, budgets);
        sim.settle();
        sim
    }

    /// The brokers, created but not started: nothing delivered yet.
    pub fn unsettled(size: u32, fanout: u32, budgets: Budgets) -> Sim {
        let topo = Topology::new(size, fanout).unwrap();
        let mut nodes = Vec::new();
        for r in 0..size {
            let key = key_of(r);
            let expected = topo
                .children(r)
                .map(|c| (c, curve_principal(&key_of(c))))
                .collect();
            let parent = topo.parent(r).map(|p| Card {
                public_key: key_of(p),
                endpoint: Some(format!("sim://{p}")),
            });
            let cfg = CoreConfig {
                rank: r,
                topo,
                instance: "sim".into(),
                parent,
                expected,
                owner_uid: OWNER_UID,
                owner_principal: "unix:owner".into(),
                timing: timing(),
                info: BrokerInfo {
                    public_key: canopy_security::z85::encode(&key),
                    ..Default::default()
                },
                remote_mech: Mech::Curve,
                seed: 7 + r as u64,
                budgets,
                child_addresses: HashMap::new(),
                exec_mode: exec::ExecMode::Owner,
            };
            nodes.push(Node {
                core: BrokerCore::new(cfg, 0),
                key,
                conn: None,
                conn_key: key,
                exit: None,
                rebinds: 0,
                next_key: None,
                ring: None,
                spawned: Vec::new(),
                signals: Vec::new(),
                stdin: Vec::new(),
            });
        }
        Sim {
            now: 0,
            nodes,
            topo,
            cut: Default::default(),
            stalled: Default::default(),
            stalled_queue: Vec::new(),
            queue: VecDeque::new(),
            inbox: BTreeMap::new(),
            closed: Default::default(),
            remote_inbox: Vec::new(),
            policy: Box::new(|s| {
                Err((s.principal.clone().unwrap_or_default(), "owner only".into()))
            }),
            decide_ms: 1,
            jobs: Vec::new(),
            reloads: 0,
            tag: 0,
        }
    }

    pub fn principal(&self, rank: u32) -> String {
        curve_principal(&self.nodes[rank as usize].key)
    }

    fn push(&mut self, rank: u32, input: Input<Vec<u8>>) {
        if self.stalled.contains(&rank) {
            self.stalled_queue.push(Delivery::Input(rank, input));
        } else {
            self.queue.push_back(Delivery::Input(rank, input));
        }
    }

    /// Let messages held for stalled ranks through.
    pub fn unstall(&mut self, rank: u32) {
        self.stalled.remove(&rank);
        let held = std::mem::take(&mut self.stalled_queue);
        for Delivery::Input(r, i) in held {
            self.push(r, i);
        }
    }

    /// Deliver everything until nothing moves (time stands still).
    pub fn settle(&mut self) {
        for _ in 0..100_000 {
            let mut moved = false;
            for r in 0..self.nodes.len() as u32 {
                moved |= self.drain(r);
            }
            let due: Vec<(u64, u32, Done)> = {
                let now = self.now;
                let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.jobs)
                    .into_iter()
                    .partition(|j| j.0 <= now);
                self.jobs = later;
                due
            };
            for (_, r, d) in due {
                moved = true;
                self.push(r, Input::Done(d));
            }
            if let Some(Delivery::Input(r, input)) = self.queue.pop_front() {
                moved = true;
                let now = self.now;
                self.nodes[r as usize].core.handle(now, input);
            }
            if !moved {
                return;
            }
        }
        panic!("the simulation did not settle");
    }

    /// Advance the clock to `t`, firing every timer on the way.
    pub fn run_until(&mut self, t: u64) {
        self.settle();
        while self.now < t {
            let next_job = self.jobs.iter().map(|j| j.0).min().unwrap_or(u64::MAX);
            let next_timer = self
                .nodes
                .iter()
                .map(|n| n.core.poll_timeout())
                .min()
                .unwrap_or(u64::MAX);
            self.now = next_timer.min(next_job).max(self.now + 1).min(t);
            let now = self.now;
            for n in &mut self.nodes {
                if n.core.poll_timeout() <= now {
                    n.core.handle_timeout(now);
                }
            }
            self.settle();
        }
    }

    pub fn run_for(&mut self, ms: u64) {
        let t = self.now + ms;
        self.run_until(t);
    }

    /// Handle one node's output; true if there was any.
    fn drain(&mut self, r: u32) -> bool {
        let mut moved = false;
        // As the shell does at the end of each turn of its loop.
        self.nodes[r as usize].core.flush_exec();
        while let Some(ev) = self.nodes[r as usize].core.poll_event() {
            moved = true;
            self.apply(r, ev);
        }
        while let Some(t) = self.nodes[r as usize].core.poll_transmit() {
            moved = true;
            self.transmit(r, t);
        }
        moved
    }

    fn apply(&mut self, r: u32, ev: Event) {
        let now = self.now;
        let n = &mut self.nodes[r as usize];
        match ev {
            Event::ConnectParent { identity, .. } => {
                n.conn = Some(identity);
                n.conn_key = n.key;
            }
            Event::ParentLost => n.conn = None,
            Event::Close { id } => {
                self.closed.insert((r, id));
            }
            Event::Job(job) => {
                let done = match job {
                    Job::Admit { ticket, subject } => Some(Done::Admitted {
                        ticket,
                        verdict: {
                            let mut s = subject.clone();
                            if s.principal.is_none() {
                                s.principal = s.uid.map(|u| format!("unix:u{u}"));
                            }
                            (self.policy)(&s)
                        },
                    }),
                    Job::Veto {
                        ticket, principal, ..
                    } => Some(Done::Vetoed {
                        ticket,
                        veto: (self.policy)(&Subject {
                            principal: Some(principal),
                            uid: None,
                            mech: Mech::Curve,
                            address: String::new(),
                        })
                        .err()
                        .map(|e| e.1),
                    }),
                    Job::ReloadPolicy { req } => {
                        self.reloads += 1;
                        Some(Done::PolicyReloaded {
                            req,
                            result: Ok("reloaded".into()),
                        })
                    }
                    Job::Explain { req, .. } => Some(Done::Explained {
                        req,
                        result: Ok(b"{}".to_vec()),
                    }),
                    Job::Whoami { req, principal, .. } => Some(Done::Explained {
                        req,
                        result: Ok(format!("{{\"principal\":\"{principal}\"}}").into_bytes()),
                    }),
                    Job::RoleRefused { .. } | Job::ExecAudit { .. } => None,
                };
                if let Some(d) = done {
                    self.jobs.push((now + self.decide_ms, r, d));
                }
            }
            Event::ReloadKeys { req } => {
                let ring = n.ring.clone().unwrap_or_default();
                n.core.handle(
                    now,
                    Input::KeysReloaded {
                        req,
                        result: Ok(ring),
                    },
                );
            }
            Event::LoadNextKey { req } => {
                let result = n.next_key.ok_or_else(|| "no .next key".to_string());
                n.core.handle(now, Input::NextKey { req, result });
            }
            Event::AdoptKey => {
                if let Some(k) = n.next_key.take() {
                    n.key = k;
                }
            }
            Event::AdmitPeers(_) => {}
            Event::Rebind { .. } => n.rebinds += 1,
            Event::ExecSpawn(sp) => n.spawned.push(sp),
            Event::ExecSignal { sid, sig } => n.signals.push((sid, sig)),
            Event::ExecStdin { sid, data } => n.stdin.push((sid, data)),
            Event::Exit(e) => n.exit = Some(e),
        }
    }

    fn transmit(&mut self, r: u32, t: Transmit<Vec<u8>>) {
        match t {
            Transmit::Parent(header, payload) => {
                let Some(p) = self.topo.parent(r) else { return };
                let Some(rid) = self.nodes[r as usize].conn.clone() else {
                    return;
                };
                if self.cut.contains(&r) {
                    self.push(
                        r,
                        Input::ParentGone {
                            reason: "cut".into(),
                        },
                    );
                    return;
                }
                let user_id = curve_principal(&self.nodes[r as usize].conn_key);
                self.push(
                    p,
                    Input::Child {
                        rid,
                        user_id,
                        address: "sim".into(),
                        header,
                        payload,
                    },
                );
            }
            Transmit::Child(rid, header, payload) => {
                let child = self
                    .topo
                    .children(r)
                    .find(|c| self.nodes[*c as usize].conn.as_deref() == Some(&rid[..]));
                match child {
                    Some(c) if !self.cut.contains(&c) => {
                        self.push(c, Input::Parent { header, payload })
                    }
                    _ => self.push(r, Input::ChildGone { rid }),
                }
            }
            Transmit::Event {
                children,
                locals,
                header,
                payload,
            } => {
                for rid in children.iter() {
                    self.transmit(
                        r,
                        Transmit::Child(rid.clone(), header.clone(), payload.clone()),
                    );
                }
                for id in locals {
                    self.transmit(r, Transmit::Local(id, header.clone(), payload.clone()));
                }
            }
            Transmit::Local(id, header, payload) => {
                if self.closed.contains(&(r, id)) {
                    // The shell writes what was queued before a close, then closes.
                    if header.errnum == 0 {
                        panic!(
                            "rank {r} sent {:?} '{}' to client {id} after closing it",
                            header.msg_type, header.topic
                        );
                    }
                }
                self.inbox
                    .entry((r, id))
                    .or_default()
                    .push(Got { header, payload });
            }
            Transmit::Remote(rid, header, payload) => {
                self.remote_inbox.push((rid, Got { header, payload }))
            }
        }
    }

    // ----- clients -----

    /// A local client of `rank` with `uid`; its id.
    pub fn connect(&mut self, rank: u32, uid: u32) -> u32 {
        let now = self.now;
        let core = &mut self.nodes[rank as usize].core;
        let id = core.new_client_id();
        core.handle(now, Input::LocalConnected { id, uid });
        self.settle();
        id
    }

    /// Send a request from a client; returns its matchtag.
    pub fn request(&mut self, rank: u32, id: u32, topic: &str, nodeid: u32, payload: &[u8]) -> u32 {
        self.tag += 1;
        let h = Header::request(topic, nodeid, self.tag);
        self.push(
            rank,
            Input::Local {
                id,
                header: h,
                payload: payload.to_vec(),
                queued: Queued::default(),
            },
        );
        self.tag
    }

    /// A client answers a request delivered to it (as a service provider).
    pub fn answer(&mut self, rank: u32, id: u32, token: u32, errnum: u32, payload: &[u8]) {
        let mut h = Header::request("ignored", 0, token);
        h.msg_type = MsgType::Response;
        h.errnum = errnum;
        self.push(
            rank,
            Input::Local {
                id,
                header: h,
                payload: payload.to_vec(),
                queued: Queued::default(),
            },
        );
    }

    /// Requests delivered to a client (as a service provider).
    pub fn requests(&self, rank: u32, id: u32) -> Vec<Got> {
        self.got(rank, id)
            .into_iter()
            .filter(|g| g.header.msg_type == MsgType::Request)
            .collect()
    }

    pub fn responses(&self, rank: u32, id: u32, tag: u32) -> Vec<Got> {
        self.got(rank, id)
            .into_iter()
            .filter(|g| g.header.msg_type == MsgType::Response && g.header.matchtag == tag)
            .collect()
    }

    pub fn events(&self, rank: u32, id: u32) -> Vec<Got> {
        self.got(rank, id)
            .into_iter()
            .filter(|g| g.header.msg_type == MsgType::Event)
            .collect()
    }

    pub fn got(&self, rank: u32, id: u32) -> Vec<Got> {
        self.inbox.get(&(rank, id)).cloned().unwrap_or_default()
    }

    pub fn publish(&mut self, rank: u32, id: u32, topic: &str, data: &[u8]) -> u32 {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(data);
        self.request(rank, id, "event.pub", 0, &body)
    }

    /// A record from the local command of session `sid` on `rank`.
    pub fn exec_record(&mut self, rank: u32, sid: u64, record: Vec<u8>) {
        self.push(rank, Input::ExecRecord { sid, record });
    }

    /// A local client closes its connection.
    pub fn close(&mut self, rank: u32, id: u32) {
        self.push(rank, Input::ClientClosed { id });
    }

    pub fn full(&self) -> bool {
        self.nodes[0].core.health().is_full()
    }
}
