//! The TOML as written: one [`RawFile`] per file, every value with its span,
//! then merged key by key into one [`Merged`] that remembers which file and
//! where each value came from.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;
use toml_edit::{ImDocument, Item, TableLike, Value};

use crate::budgets::BudgetKey;
use crate::error::{ConfigError, Location};
use crate::Mechanism;

/// One configuration file's text.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    pub path: PathBuf,
    pub text: String,
}

/// A span in one of the sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pos {
    pub file: usize,
    pub span: Range<usize>,
}

/// A value and where it was written.
#[derive(Debug, Clone)]
pub(crate) struct Val<T> {
    pub value: T,
    pub pos: Pos,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFile {
    bootstrap: Option<RawBootstrap>,
    gssapi: Option<RawGssapi>,
    timing: Option<RawTiming>,
    policy: Option<RawPolicy>,
    budgets: Option<RawBudgets>,
    clients: Option<RawClients>,
    exec: Option<RawExec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExec {
    helper: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClients {
    bind: Option<Spanned<String>>,
    hosts: Option<Spanned<Vec<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBootstrap {
    default_port: Option<Spanned<i64>>,
    default_bind: Option<Spanned<String>>,
    default_connect: Option<Spanned<String>>,
    mechanism: Option<Spanned<Mechanism>>,
    curve_cert: Option<Spanned<String>>,
    curve_public_certs: Option<Spanned<RawPublicCerts>>,
    fanout: Option<Spanned<i64>>,
    hosts: Option<Spanned<Vec<Spanned<RawHost>>>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHost {
    pub host: Spanned<String>,
    pub bind: Option<Spanned<String>>,
    pub connect: Option<Spanned<String>>,
    pub parent: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGssapi {
    service: Option<Spanned<String>>,
    keytab: Option<Spanned<String>>,
    realm: Option<Spanned<String>>,
    kex_port: Option<Spanned<i64>>,
    max_bindings_per_principal: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTiming {
    heartbeat: Option<Spanned<f64>>,
    torpid: Option<Spanned<f64>>,
    lost: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    file: Option<Spanned<String>>,
    audit_log: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudgets {
    max_message: Option<Spanned<RawSize>>,
    client_bytes: Option<Spanned<RawSize>>,
    principal_bytes: Option<Spanned<RawSize>>,
    total_bytes: Option<Spanned<RawSize>>,
    connections: Option<Spanned<RawSize>>,
    in_flight: Option<Spanned<RawSize>>,
    neighbour_bytes: Option<Spanned<RawSize>>,
}

/// A budget as written: an integer, or a string with a unit (`"16MiB"`).
#[derive(Debug, Clone)]
pub(crate) enum RawSize {
    Int(i64),
    Str(String),
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer, or a size string such as \"16MiB\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(RawSize::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(RawSize::Int(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawSize::Str(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `curve_public_certs`: a directory, or one path per host in rank order.
#[derive(Debug, Clone)]
pub(crate) enum RawPublicCerts {
    Dir(String),
    List(Vec<Spanned<String>>),
}

impl<'de> Deserialize<'de> for RawPublicCerts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawPublicCerts;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a directory path, or an array of certificate paths (one per host)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawPublicCerts::Dir(v.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(e) = seq.next_element::<Spanned<String>>()? {
                    out.push(e);
                }
                Ok(RawPublicCerts::List(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// Every file's keys, merged. A key set in two files is an error.
#[derive(Debug, Default)]
pub(crate) struct Merged {
    /// Where `[bootstrap]` (or the first `bootstrap.` key) is, first file.
    pub bootstrap_at: Option<Pos>,
    pub gssapi_at: Option<Pos>,
    pub default_port: Option<Val<i64>>,
    pub default_bind: Option<Val<String>>,
    pub default_connect: Option<Val<String>>,
    pub mechanism: Option<Val<Mechanism>>,
    pub curve_cert: Option<Val<String>>,
    pub curve_public_certs: Option<Val<RawPublicCerts>>,
    pub fanout: Option<Val<i64>>,
    pub hosts: Option<Val<Vec<Spanned<RawHost>>>>,
    pub service: Option<Val<String>>,
    pub keytab: Option<Val<String>>,
    pub realm: Option<Val<String>>,
    pub kex_port: Option<Val<i64>>,
    pub max_bindings_per_principal: Option<Val<i64>>,
    pub heartbeat: Option<Val<f64>>,
    pub torpid: Option<Val<f64>>,
    pub lost: Option<Val<f64>>,
    pub policy_file: Option<Val<String>>,
    pub audit_log: Option<Val<String>>,
    pub clients_bind: Option<Val<String>>,
    pub clients_hosts: Option<Val<Vec<String>>>,
    pub exec_helper: Option<Val<String>>,
    /// `[budgets]`, key by key (`BudgetKey::ALL` order).
    pub budgets: [Option<Val<RawSize>>; 7],
}

/// Locations for the sources.
pub(crate) struct Ctx<'a> {
    pub sources: &'a [Source],
}

impl Ctx<'_> {
    pub fn loc(&self, pos: &Pos) -> Location {
        match self.sources.get(pos.file) {
            Some(s) => Location::at(&s.path, &s.text, pos.span.start),
            None => Location::at(Path::new("(no file)"), "", 0),
        }
    }

    pub fn pos(&self, file: usize, span: Range<usize>) -> Pos {
        Pos { file, span }
    }

    /// The start of the first file, for errors about something missing
    /// everywhere.
    pub fn start(&self) -> Pos {
        Pos {
            file: 0,
            span: 0..0,
        }
    }
}

fn put<T>(
    ctx: &Ctx<'_>,
    slot: &mut Option<Val<T>>,
    new: Option<Spanned<T>>,
    file: usize,
    key: &str,
) -> Result<(), ConfigError> {
    let Some(new) = new else { return Ok(()) };
    let span = new.span();
    let pos = ctx.pos(file, span);
    if let Some(old) = slot {
        return Err(ConfigError::DuplicateKey {
            at: ctx.loc(&pos),
            key: key.to_string(),
            first: ctx.loc(&old.pos),
        });
    }
    *slot = Some(Val {
        value: new.into_inner(),
        pos,
    });
    Ok(())
}

/// Parse and merge every source, in order.
pub(crate) fn parse_and_merge(ctx: &Ctx<'_>) -> Result<Merged, ConfigError> {
    let mut m = Merged::default();
    for (file, source) in ctx.sources.iter().enumerate() {
        let (raw, doc) = parse_file(&source.path, &source.text)?;
        let top = doc.as_table();
        let table_at = |name: &str| {
            let span = top
                .key(name)
                .and_then(|k| k.span())
                .or_else(|| top.get(name).and_then(|i| i.span()))
                .unwrap_or(0..0);
            ctx.pos(file, span)
        };
        if let Some(b) = raw.bootstrap {
            if m.bootstrap_at.is_none() {
                m.bootstrap_at = Some(table_at("bootstrap"));
            }
            put(
                ctx,
                &mut m.default_port,
                b.default_port,
                file,
                "bootstrap.default_port",
            )?;
            put(
                ctx,
                &mut m.default_bind,
                b.default_bind,
                file,
                "bootstrap.default_bind",
            )?;
            put(
                ctx,
                &mut m.default_connect,
                b.default_connect,
                file,
                "bootstrap.default_connect",
            )?;
            put(
                ctx,
                &mut m.mechanism,
                b.mechanism,
                file,
                "bootstrap.mechanism",
            )?;
            put(
                ctx,
                &mut m.curve_cert,
                b.curve_cert,
                file,
                "bootstrap.curve_cert",
            )?;
            put(
                ctx,
                &mut m.curve_public_certs,
                b.curve_public_certs,
                file,
                "bootstrap.curve_public_certs",
            )?;
            put(ctx, &mut m.fanout, b.fanout, file, "bootstrap.fanout")?;
            put(ctx, &mut m.hosts, b.hosts, file, "bootstrap.hosts")?;
        }
        if let Some(g) = raw.gssapi {
            if m.gssapi_at.is_none() {
                m.gssapi_at = Some(table_at("gssapi"));
            }
            put(ctx, &mut m.service, g.service, file, "gssapi.service")?;
            put(ctx, &mut m.keytab, g.keytab, file, "gssapi.keytab")?;
            put(ctx, &mut m.realm, g.realm, file, "gssapi.realm")?;
            put(ctx, &mut m.kex_port, g.kex_port, file, "gssapi.kex_port")?;
            put(
                ctx,
                &mut m.max_bindings_per_principal,
                g.max_bindings_per_principal,
                file,
                "gssapi.max_bindings_per_principal",
            )?;
        }
        if let Some(t) = raw.timing {
            put(ctx, &mut m.heartbeat, t.heartbeat, file, "timing.heartbeat")?;
            put(ctx, &mut m.torpid, t.torpid, file, "timing.torpid")?;
            put(ctx, &mut m.lost, t.lost, file, "timing.lost")?;
        }
        if let Some(x) = raw.exec {
            put(ctx, &mut m.exec_helper, x.helper, file, "exec.helper")?;
        }
        if let Some(c) = raw.clients {
            put(ctx, &mut m.clients_bind, c.bind, file, "clients.bind")?;
            put(ctx, &mut m.clients_hosts, c.hosts, file, "clients.hosts")?;
        }
        if let Some(p) = raw.policy {
            put(ctx, &mut m.policy_file, p.file, file, "policy.file")?;
            put(ctx, &mut m.audit_log, p.audit_log, file, "policy.audit_log")?;
        }
        if let Some(b) = raw.budgets {
            let given = [
                b.max_message,
                b.client_bytes,
                b.principal_bytes,
                b.total_bytes,
                b.connections,
                b.in_flight,
                b.neighbour_bytes,
            ];
            for ((slot, v), k) in m.budgets.iter_mut().zip(given).zip(BudgetKey::ALL) {
                put(ctx, slot, v, file, &format!("budgets.{}", k.name()))?;
            }
        }
    }
    Ok(m)
}

/// Parse one file: TOML syntax first (for spans of every key), then the
/// typed model with unknown keys refused.
fn parse_file<'a>(
    path: &Path,
    text: &'a str,
) -> Result<(RawFile, ImDocument<&'a str>), ConfigError> {
    let doc = ImDocument::parse(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        ConfigError::Syntax {
            at: Location::at(path, text, offset),
            key: guess_key(text, offset),
            message: first_line(e.message()),
        }
    })?;
    let raw: RawFile = toml::from_str(text).map_err(|e| serde_error(path, text, &doc, &e))?;
    Ok((raw, doc))
}

/// toml's message on one line, with Rust type names in admin's words.
fn first_line(s: &str) -> String {
    let one: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    one.join(", ")
        .replace("expected i64", "expected an integer")
        .replace("expected f64", "expected a number")
        .replace("a borrowed string", "a string")
}

/// Turn a typed-model error into one naming file, line and key.
fn serde_error(
    path: &Path,
    text: &str,
    doc: &ImDocument<&str>,
    e: &toml::de::Error,
) -> ConfigError {
    let offset = e.span().map_or(0, |s| s.start);
    let at = Location::at(path, text, offset);
    let message = first_line(e.message());
    let key = key_at(doc, offset).unwrap_or_else(|| guess_key(text, offset));
    if let Some(rest) = message.strip_prefix("unknown field `") {
        // "unknown field `x`, expected one of `a`, `b`"
        let expected = rest
            .split_once(", expected ")
            .map_or("a documented key", |(_, exp)| exp)
            .trim_start_matches("one of ")
            .to_string();
        return ConfigError::UnknownKey { at, key, expected };
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or("");
        let key = if key.is_empty() {
            field.to_string()
        } else {
            format!("{key}.{field}")
        };
        return ConfigError::MissingKey {
            at,
            key,
            hint: "add it (see docs/config.md)".to_string(),
        };
    }
    ConfigError::BadType { at, key, message }
}

/// The dotted path of the key whose name or value covers `offset`.
fn key_at(doc: &ImDocument<&str>, offset: usize) -> Option<String> {
    walk_table(doc.as_table(), "", offset)
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn covers(span: Option<Range<usize>>, offset: usize) -> bool {
    span.is_some_and(|s| s.contains(&offset) || s.start == offset)
}

fn walk_table(t: &dyn TableLike, prefix: &str, offset: usize) -> Option<String> {
    for (k, item) in t.iter() {
        let path = join(prefix, k);
        if covers(t.key(k).and_then(|key| key.span()), offset) {
            return Some(path);
        }
        if let Some(found) = walk_item(item, &path, offset) {
            return Some(found);
        }
    }
    None
}

fn walk_item(item: &Item, path: &str, offset: usize) -> Option<String> {
    match item {
        Item::None => None,
        Item::Table(t) => walk_table(t, path, offset)
            .or_else(|| covers(t.span(), offset).then(|| path.to_string())),
        Item::ArrayOfTables(a) => a.iter().enumerate().find_map(|(i, t)| {
            let p = format!("{path}[{i}]");
            walk_table(t, &p, offset).or_else(|| covers(t.span(), offset).then_some(p))
        }),
        Item::Value(v) => walk_value(v, path, offset),
    }
}

fn walk_value(v: &Value, path: &str, offset: usize) -> Option<String> {
    if !covers(v.span(), offset) {
        return None;
    }
    let inner = match v {
        Value::InlineTable(t) => walk_table(t, path, offset),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, e)| walk_value(e, &format!("{path}[{i}]"), offset)),
        _ => None,
    };
    Some(inner.unwrap_or_else(|| path.to_string()))
}

/// For a syntax error, where the document cannot be walked: the key on the
/// error's line, under the nearest `[table]` header above it.
fn guess_key(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let mut offset = offset;
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let line_start = text[..offset].rfind('\n').map_or(0, |p| p + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |p| offset + p);
    let line = text[line_start..line_end].trim();
    let header = |l: &str| -> Option<String> {
        let l = l.trim();
        let inner = l.strip_prefix("[[").and_then(|r| r.split("]]").next());
        let inner = inner.or_else(|| l.strip_prefix('[').and_then(|r| r.split(']').next()));
        inner.map(|s| s.trim().to_string())
    };
    if let Some(h) = header(line) {
        return h;
    }
    let table = text[..line_start]
        .lines()
        .rev()
        .find_map(header)
        .unwrap_or_default();
    let key = line.split_once('=').map(|(k, _)| k.trim()).unwrap_or("");
    match (table.is_empty(), key.is_empty()) {
        (_, true) if table.is_empty() => "(top level)".to_string(),
        (_, true) => table,
        (true, false) => key.to_string(),
        (false, false) => format!("{table}.{key}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guesses_key_of_a_syntax_error() {
        let text = "[bootstrap]\ndefault_port = \n";
        assert_eq!(
            guess_key(text, text.find(" \n").unwrap()),
            "bootstrap.default_port"
        );
        assert_eq!(guess_key("x = ", 3), "x");
        assert_eq!(guess_key("[a\n", 1), "a");
        assert_eq!(guess_key("", 0), "(top level)");
    }

    #[test]
    fn key_at_finds_nested_paths() {
        let text = "[bootstrap]\nhosts = [ { host = \"a\" }, { host = \"b\", parent = \"a\" } ]\n[[x.y]]\nz = 1\n";
        let doc = ImDocument::parse(text).unwrap();
        let at = |needle: &str| key_at(&doc, text.find(needle).unwrap());
        assert_eq!(at("parent").as_deref(), Some("bootstrap.hosts[1].parent"));
        assert_eq!(at("\"b\"").as_deref(), Some("bootstrap.hosts[1].host"));
        assert_eq!(at("z =").as_deref(), Some("x.y[0].z"));
    }
}
