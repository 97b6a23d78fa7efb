//! `canopy-ca`: the site CA, a service offered by a client of its broker
//! (docs/imp.md, "Site CA"). The decisions are in the library
//! (`canopy_ca`); this connects, registers, and answers.
//!
//! * `canopy-ca [--config /etc/canopy/ca.toml] [--uri URI]`: offer
//!   `ca.issue` and `ca.info` on the broker at `--uri` (else
//!   `CANOPY_URI`, else the system instance's `/run/canopy/local`), and
//!   serve until the broker goes away;
//! * `canopy-ca keygen --out PATH`: write the CA's key pair (`PATH`, mode
//!   0600, and `PATH.pub`).
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use canopy_ca::{CaConfig, IssueInput, SystemAccounts, DEFAULT_CONFIG, METHODS};
use canopy_client::{Client, ClientError};
use canopy_proto::{FLAG_NORESPONSE, NODEID_ANY};
use clap::{Parser, Subcommand};

/// Canopy's site CA: certifies users' exec keys for the callers its own
/// broker authenticated (canopy cert request).
#[derive(Debug, Parser)]
#[command(name = "canopy-ca", version, about)]
struct Cli {
    /// The configuration file (see etc/ca.toml).
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// The broker to connect to (default: $CANOPY_URI, else this host's
    /// system instance).
    #[arg(long)]
    uri: Option<String>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Write a new CA key pair: PATH (secret, mode 0600) and PATH.pub
    /// (for imp.toml's trusted_ca_keys).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Some(Cmd::Keygen { out }) => keygen(&out),
        None => serve(&cli.config, cli.uri.as_deref()),
    };
    if let Err(e) = r {
        // Every error message already includes its cause.
        eprintln!("canopy-ca: error: {e}");
        std::process::exit(1);
    }
}

fn keygen(out: &std::path::Path) -> Result<()> {
    let key = canopy_imp::keys::generate()?;
    let public = canopy_imp::keys::write_pair(out, &key)?;
    println!(
        "canopy-ca: wrote {} (secret, mode 0600) and {}; key id {}",
        out.display(),
        public.display(),
        canopy_imp::envelope::key_id(&key.verifying_key())
    );
    Ok(())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn serve(config: &std::path::Path, uri: Option<&str>) -> Result<()> {
    let uid = nix::unistd::geteuid().as_raw();
    let cfg = CaConfig::load(config, uid)?;
    let key = cfg.load_key(uid)?;
    let keyid = canopy_imp::envelope::key_id(&key.verifying_key());
    let mut client = Client::connect(uri)?;
    let methods: serde_json::Map<String, serde_json::Value> = METHODS
        .iter()
        .map(|(m, r)| (m.to_string(), serde_json::Value::String(r.to_string())))
        .collect();
    let body = serde_json::json!({"namespace": cfg.namespace, "methods": methods});
    let m = client
        .rpc(
            "service.add",
            NODEID_ANY,
            body.to_string().as_bytes(),
            Duration::from_secs(10),
        )
        .map_err(|e| anyhow::anyhow!("cannot offer namespace {}: {e}", cfg.namespace))?;
    let rank = serde_json::from_slice::<serde_json::Value>(&m.payload)
        .ok()
        .and_then(|v| v.get("rank")?.as_u64())
        .unwrap_or(u64::from(m.header.nodeid));
    println!(
        "canopy-ca: serving {} on rank {rank}, key id {keyid}",
        cfg.namespace
    );
    std::io::stdout().flush()?;
    tracing::info!(
        "ca: serving {} on rank {rank} with key id {keyid}, lifetime {} s, realms [{}]",
        cfg.namespace,
        cfg.lifetime,
        cfg.realms.iter().cloned().collect::<Vec<_>>().join(", ")
    );
    loop {
        let m = match client.next_request(Duration::from_secs(60)) {
            Ok(m) => m,
            Err(ClientError::Timeout(_)) => continue,
            Err(ClientError::Closed) => {
                eprintln!("canopy-ca: the broker closed the connection; exiting");
                return Ok(());
            }
            Err(e) => anyhow::bail!("the connection to the broker ended: {e}"),
        };
        let h = &m.header;
        let a = canopy_ca::handle(
            &cfg,
            &key,
            &h.topic,
            &IssueInput {
                principal: &h.userid,
                direct: canopy_ca::is_direct(h.flags),
                payload: &m.payload,
            },
            &SystemAccounts,
            now(),
        );
        if a.errnum == 0 {
            tracing::info!("{}", a.log);
        } else {
            tracing::warn!("{}", a.log);
        }
        if h.flags & FLAG_NORESPONSE == 0 {
            client
                .respond(h.matchtag, a.errnum, &a.payload)
                .map_err(|e| anyhow::anyhow!("cannot answer the broker: {e}"))?;
        }
    }
}
