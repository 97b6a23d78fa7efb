//! `canopy receipt verify`: check `canopy exec` receipts offline against
//! the nodes' public keys (`canopy_imp::receipt::verify_receipt`,
//! docs/imp.md "Receipt").

use std::path::{Path, PathBuf};

use anyhow::Result;
use canopy_imp::envelope::{key_id, sha256_hex};
use canopy_imp::receipt::{verify_receipt, Exit, Receipt};
use clap::Subcommand;
use ed25519_dalek::VerifyingKey;

#[derive(Subcommand)]
pub(crate) enum ReceiptCmd {
    /// Verify a file of receipts (one receipt envelope per line, exactly
    /// as the node signed it) against the nodes' public keys; prints one
    /// line per receipt, and for each failure the file, line and reason
    /// (then exits 1).
    Verify {
        /// The receipts: JSON lines, one envelope per line.
        file: PathBuf,
        /// A node's receipt public key file (`ed25519:<base64>`, as
        /// `canopy-imp keygen` writes PATH.pub); repeat for each node.
        #[arg(long = "node-key", value_name = "PATH", required = true)]
        node_keys: Vec<PathBuf>,
        /// The request envelope that was sent: each receipt's
        /// request_digest must be its SHA-256 (trailing white space in the
        /// file is ignored: an envelope ends with `}`).
        #[arg(long, value_name = "FILE")]
        request: Option<PathBuf>,
    },
}

pub(crate) fn run(cmd: ReceiptCmd) -> Result<i32> {
    match cmd {
        ReceiptCmd::Verify {
            file,
            node_keys,
            request,
        } => verify(&file, &node_keys, request.as_deref()),
    }
}

/// One line's verdict.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// 1-based line number in the file.
    pub line: usize,
    /// The receipt and the key id that signed it, or why it failed.
    pub result: Result<(Receipt, String), String>,
}

/// Verify every non-empty line of `text` against `keys`; with
/// `request_digest`, each receipt must name it.
pub(crate) fn verify_lines(
    text: &[u8],
    keys: &[VerifyingKey],
    request_digest: Option<&str>,
) -> Vec<Verdict> {
    let mut out = Vec::new();
    for (i, line) in text.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let result = match verify_receipt(line, keys) {
            Ok((r, k)) => match request_digest {
                Some(d) if r.request_digest != d => Err(format!(
                    "the receipt is for request {}, not for the request given ({d})",
                    r.request_digest
                )),
                _ => Ok((r, key_id(k))),
            },
            Err(e) => Err(e.to_string()),
        };
        out.push(Verdict {
            line: i + 1,
            result,
        });
    }
    out
}

/// One receipt, one line.
pub(crate) fn describe(r: &Receipt, signer: &str) -> String {
    let exit = match r.exit {
        Exit::Status(s) => format!("status {s}"),
        Exit::Signal(s) => format!("signal {s}"),
    };
    format!(
        "rank {} host {} uid {} exit {exit} start {} end {} request {} stdout {} stderr {} node-key {}",
        r.rank,
        r.host,
        r.uid,
        r.start,
        r.end,
        r.request_digest,
        r.stdout_sha256,
        r.stderr_sha256,
        signer
    )
}

fn verify(file: &Path, key_files: &[PathBuf], request: Option<&Path>) -> Result<i32> {
    let keys = key_files
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).map_err(|e| {
                anyhow::anyhow!("cannot read --node-key {}: {e}; check the path", p.display())
            })?;
            canopy_imp::keys::parse_public(&text).ok_or_else(|| {
                anyhow::anyhow!(
                    "--node-key {} is not an ed25519 public key file (one line `ed25519:<base64>`, the PATH.pub canopy-imp keygen writes)",
                    p.display()
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let digest = match request {
        Some(p) => {
            let mut b = std::fs::read(p).map_err(|e| {
                anyhow::anyhow!("cannot read the request envelope {}: {e}", p.display())
            })?;
            while b.last().is_some_and(u8::is_ascii_whitespace) {
                b.pop();
            }
            Some(sha256_hex(&b))
        }
        None => None,
    };
    let text = std::fs::read(file)
        .map_err(|e| anyhow::anyhow!("cannot read the receipts in {}: {e}", file.display()))?;
    let verdicts = verify_lines(&text, &keys, digest.as_deref());
    anyhow::ensure!(
        !verdicts.is_empty(),
        "{} holds no receipts; give the file canopy exec wrote (one envelope per line)",
        file.display()
    );
    let mut failed = 0;
    for v in &verdicts {
        match &v.result {
            Ok((r, k)) => outln!("{}:{}: ok {}", file.display(), v.line, describe(r, k)),
            Err(why) => {
                failed += 1;
                eprintln!("{}:{}: FAILED: {why}", file.display(), v.line);
            }
        }
    }
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} receipts in {} failed verification",
        verdicts.len(),
        file.display()
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn receipt(rank: u32) -> Receipt {
        Receipt {
            v: 1,
            request_digest: sha256_hex(b"request"),
            rank,
            host: format!("node{rank}"),
            uid: 1000,
            start: 10,
            end: 11,
            exit: Exit::Status(0),
            stdout_sha256: sha256_hex(b"out"),
            stderr_sha256: sha256_hex(b""),
        }
    }

    #[test]
    fn each_line_is_verified_and_failures_name_their_line() {
        let n0 = SigningKey::from_bytes(&[1; 32]);
        let n1 = SigningKey::from_bytes(&[2; 32]);
        let keys = [n0.verifying_key(), n1.verifying_key()];
        let mut text = receipt(0).sign(&n0);
        text.push(b'\n');
        text.push(b'\n');
        let mut tampered = String::from_utf8(receipt(1).sign(&n1)).unwrap();
        // One byte of the payload's base64: the signature no longer holds.
        let at = tampered.find("\"payload\":\"").unwrap() + 12;
        let c = if &tampered[at..at + 1] == "A" {
            "B"
        } else {
            "A"
        };
        tampered.replace_range(at..at + 1, c);
        text.extend_from_slice(tampered.as_bytes());
        text.push(b'\n');
        text.extend_from_slice(&receipt(2).sign(&SigningKey::from_bytes(&[9; 32])));
        text.push(b'\n');
        let v = verify_lines(&text, &keys, None);
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].line, 1);
        let (r, k) = v[0].result.as_ref().unwrap();
        assert_eq!((r.rank, k.as_str()), (0, key_id(&keys[0]).as_str()));
        assert!(describe(r, k).starts_with("rank 0 host node0 uid 1000 exit status 0"));
        assert_eq!(v[1].line, 3);
        let e = v[1].result.as_ref().unwrap_err();
        assert!(
            e.contains("bad signature") || e.contains("malformed"),
            "{e}"
        );
        assert_eq!(v[2].line, 4);
        assert!(v[2]
            .result
            .as_ref()
            .unwrap_err()
            .contains("not among the node keys given"));
        // The request digest must match when given.
        let good = receipt(0).sign(&n0);
        assert!(verify_lines(&good, &keys, Some(&sha256_hex(b"request")))[0]
            .result
            .is_ok());
        let e = verify_lines(&good, &keys, Some(&sha256_hex(b"other")))
            .remove(0)
            .result
            .unwrap_err();
        assert!(e.contains("not for the request given"), "{e}");
    }
}
