//! `canopy-kvs`: a small key-value service offered by a client, in async
//! Rust (docs/protocol.md §6.1).
//!
//! It connects to a broker (`--uri`, else `CANOPY_URI`), offers namespace
//! `kvs` (or `--namespace NS`) there, prints `canopy-kvs: serving NS on
//! rank R` once it does, and serves until the broker goes away:
//!
//! | method | role | request | response |
//! |---|---|---|---|
//! | `NS.get` | user | a key | its value; ENOENT if unset |
//! | `NS.put` | operator | `{"key":K,"value":V}` (strings) | `{"key":K,"version":N,"seq":S}` |
//! | `NS.del` | operator | a key | empty; ENOENT if unset |
//! | `NS.keys` | user | empty, or a key prefix | JSON array of the keys, sorted |
//!
//! Each put and del publishes the event `NS.changed`, payload
//! `{"key":K,"op":"put"|"del","by":PRINCIPAL,"version":N}`: a provider may
//! publish events in a namespace it offers.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use canopy_client::aio::{AsyncClient, Request, ServiceError};
use clap::Parser;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// A key-value service offered by a client of a canopy broker.
#[derive(Debug, Parser)]
#[command(name = "canopy-kvs", version, about)]
struct Cli {
    /// The broker to connect to (default: $CANOPY_URI).
    #[arg(long)]
    uri: Option<String>,
    /// The namespace to offer.
    #[arg(long, default_value = "kvs")]
    namespace: String,
}

/// The store: each key's value and the version it was last written at.
#[derive(Default)]
struct Store {
    map: BTreeMap<String, (String, u64)>,
    version: u64,
}

struct Kvs {
    store: Mutex<Store>,
    client: AsyncClient,
    namespace: String,
}

fn text(payload: &[u8], what: &str) -> Result<String, ServiceError> {
    String::from_utf8(payload.to_vec())
        .map_err(|_| ServiceError::malformed(format!("{what} must be UTF-8 text")))
}

fn key(payload: &[u8]) -> Result<String, ServiceError> {
    let k = text(payload, "the key")?;
    if k.is_empty() {
        return Err(ServiceError::invalid("send a key (non-empty text)"));
    }
    Ok(k)
}

impl Kvs {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn handle(&self, r: Request) -> Result<Vec<u8>, ServiceError> {
        match r.method.as_str() {
            "get" => {
                let k = key(&r.payload)?;
                match self.store().map.get(&k) {
                    Some((v, _)) => Ok(v.clone().into_bytes()),
                    None => Err(ServiceError::not_found(format!(
                        "no key '{k}'; list them with {}.keys",
                        self.namespace
                    ))),
                }
            }
            "put" => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Put {
                    key: String,
                    value: String,
                }
                let p: Put = serde_json::from_slice(&r.payload).map_err(|e| {
                    ServiceError::malformed(format!(
                        "send {{\"key\":K,\"value\":V}} with string K and V: {e}"
                    ))
                })?;
                if p.key.is_empty() {
                    return Err(ServiceError::invalid("the key must not be empty"));
                }
                let version = {
                    let mut s = self.store();
                    s.version += 1;
                    let v = s.version;
                    s.map.insert(p.key.clone(), (p.value, v));
                    v
                };
                let seq = self.changed(&p.key, "put", &r.principal, version).await;
                Ok(json!({"key": p.key, "version": version, "seq": seq})
                    .to_string()
                    .into_bytes())
            }
            "del" => {
                let k = key(&r.payload)?;
                let version = {
                    let mut s = self.store();
                    if s.map.remove(&k).is_none() {
                        return Err(ServiceError::not_found(format!("no key '{k}' to delete")));
                    }
                    s.version += 1;
                    s.version
                };
                self.changed(&k, "del", &r.principal, version).await;
                Ok(Vec::new())
            }
            "keys" => {
                let prefix = text(&r.payload, "the prefix")?;
                let keys: Vec<String> = self
                    .store()
                    .map
                    .keys()
                    .filter(|k| k.starts_with(&prefix))
                    .cloned()
                    .collect();
                Ok(serde_json::to_vec(&keys).unwrap_or_default())
            }
            m => Err(ServiceError::new(
                canopy_proto::errno::ENOSYS,
                format!("{} has no method '{m}'", self.namespace),
            )),
        }
    }

    /// Publish `NS.changed`; its sequence number, or `None` (logged) if the
    /// publish failed: the change itself stands.
    async fn changed(&self, key: &str, op: &str, by: &str, version: u64) -> Option<u64> {
        let topic = format!("{}.changed", self.namespace);
        let body = json!({"key": key, "op": op, "by": by, "version": version}).to_string();
        match self.client.publish(&topic, body).await {
            Ok(seq) => Some(seq),
            Err(e) => {
                tracing::warn!("cannot publish {topic}: {e}");
                None
            }
        }
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("canopy-kvs: error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    let client = AsyncClient::connect(cli.uri.as_deref())
        .await
        .context("cannot connect")?;
    let kvs = Arc::new(Kvs {
        store: Mutex::default(),
        client: client.clone(),
        namespace: cli.namespace.clone(),
    });
    let methods = [
        ("get", "user"),
        ("put", "operator"),
        ("del", "operator"),
        ("keys", "user"),
    ];
    let reg = client
        .serve(&cli.namespace, methods, move |r| {
            let kvs = kvs.clone();
            async move { kvs.handle(r).await }
        })
        .await
        .with_context(|| format!("cannot offer namespace {}", cli.namespace))?;
    println!("canopy-kvs: serving {} on rank {}", reg.namespace, reg.rank);
    use std::io::Write;
    std::io::stdout().flush()?;
    let why = client.closed().await;
    match why {
        canopy_client::ClientError::Closed => {
            eprintln!("canopy-kvs: the broker closed the connection; exiting");
            Ok(())
        }
        e => Err(e).context("the connection to the broker ended"),
    }
}
