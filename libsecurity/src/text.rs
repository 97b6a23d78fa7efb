//! Positions and advice for errors in the text files that decide access
//! (the policy, imp.toml): shared so that every such file reports
//! `file:line:col` the same way.

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, text[line_start..offset].chars().count() + 1)
}

/// A message from the TOML parser or serde, lower-cased, with what to do;
/// `see` (e.g. ` (see etc/imp.toml)`) follows the advice for an unknown or
/// missing key.
pub fn toml_advice(msg: &str, see: &str) -> String {
    let msg = msg.trim_end();
    let advice = if msg.starts_with("unknown field") {
        format!("remove it or correct its spelling{see}")
    } else if msg.starts_with("missing field") {
        format!("add it{see}")
    } else if msg.starts_with("invalid type") || msg.starts_with("invalid value") {
        "write a value of the expected type".to_owned()
    } else if msg.contains("duplicate key") {
        "remove one of them".to_owned()
    } else {
        "fix the toml syntax".to_owned()
    };
    let mut first = msg.chars();
    let msg = match first.next() {
        Some(c) => c.to_lowercase().chain(first).collect::<String>(),
        None => "invalid toml".to_owned(),
    };
    format!("{msg}; {advice}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_characters_and_advice_says_what_to_do() {
        assert_eq!(line_col("ab\ncé d", 7), (2, 4));
        assert_eq!(line_col("é", 1), (1, 1));
        assert_eq!(
            toml_advice("unknown field `x`", " (see etc/imp.toml)"),
            "unknown field `x`; remove it or correct its spelling (see etc/imp.toml)"
        );
        assert_eq!(toml_advice("", ""), "invalid toml; fix the toml syntax");
    }
}
