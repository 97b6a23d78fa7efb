//! Z85 (ZeroMQ RFC 32): 4 bytes become 5 printable characters.

const ALPHABET: &[u8; 85] =
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Z85Error {
    #[error("z85 text length {0} is not a multiple of 5; check that the key was copied whole")]
    Length(usize),
    #[error("z85 text has an invalid character at position {0}; check the key text")]
    Char(usize),
    #[error("z85 group at position {0} overflows 32 bits; the key text is corrupt")]
    Overflow(usize),
}

/// Encode; the input length must be a multiple of 4 (keys are 32 bytes).
pub fn encode(data: &[u8]) -> String {
    assert!(
        data.len().is_multiple_of(4),
        "z85 input must be a multiple of 4 bytes"
    );
    let mut out = String::with_capacity(data.len() / 4 * 5);
    for chunk in data.chunks(4) {
        let mut v = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        let mut group = [0u8; 5];
        for g in group.iter_mut().rev() {
            *g = ALPHABET[(v % 85) as usize];
            v /= 85;
        }
        out.extend(group.iter().map(|&c| c as char));
    }
    out
}

fn value(c: u8) -> Option<u32> {
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u32)
}

/// Decode Z85 text.
pub fn decode(text: &str) -> Result<Vec<u8>, Z85Error> {
    let b = text.as_bytes();
    if !b.len().is_multiple_of(5) {
        return Err(Z85Error::Length(b.len()));
    }
    let mut out = Vec::with_capacity(b.len() / 5 * 4);
    for (gi, group) in b.chunks(5).enumerate() {
        let mut v: u64 = 0;
        for (i, &c) in group.iter().enumerate() {
            v = v * 85 + value(c).ok_or(Z85Error::Char(gi * 5 + i))? as u64;
        }
        if v > u32::MAX as u64 {
            return Err(Z85Error::Overflow(gi * 5));
        }
        out.extend_from_slice(&(v as u32).to_be_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc32_vector() {
        let data = [0x86, 0x4F, 0xD2, 0x6F, 0xB5, 0x59, 0xF7, 0x5B];
        assert_eq!(encode(&data), "HelloWorld");
        assert_eq!(decode("HelloWorld").unwrap(), data);
    }

    #[test]
    fn round_trip_and_errors() {
        let data: Vec<u8> = (0..=255u8).collect();
        assert_eq!(decode(&encode(&data)).unwrap(), data);
        assert_eq!(decode("abc"), Err(Z85Error::Length(3)));
        assert_eq!(decode("ab\"cd"), Err(Z85Error::Char(2)));
        assert_eq!(decode("#####"), Err(Z85Error::Overflow(0)));
    }
}
