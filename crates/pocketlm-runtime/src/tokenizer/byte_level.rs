//! GPT-2's byte ↔ char table: byte-level BPE vocabularies spell every byte as one printable
//! char (a space is `Ġ`). Printable Latin-1 bytes stand for themselves; the other 68 bytes
//! are shifted to U+0100.. in byte order.

fn printable(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The char that spells byte `b`.
pub(crate) fn byte_to_char(b: u8) -> char {
    BYTE_CHARS[usize::from(b)]
}

/// The byte a char spells, or `None` for chars outside the table.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let code = c as u32;
    if code < 0x100 && printable(code as u8) {
        return Some(code as u8);
    }
    // The shifted bytes, in order, are U+0100 + their rank among the non-printable bytes.
    let rank = code.checked_sub(0x100)?;
    SHIFTED_BYTES.get(rank as usize).copied()
}

/// The bytes a byte-level token spells, or `None` when a char is outside the table (an added
/// token written as plain text).
pub(crate) fn spelled_bytes(token: &str) -> Option<Vec<u8>> {
    token.chars().map(char_to_byte).collect()
}

/// The 68 non-printable bytes in order.
static SHIFTED_BYTES: [u8; 68] = {
    let mut table = [0u8; 68];
    let mut n = 0;
    let mut b = 0usize;
    while b < 256 {
        if !matches!(b as u8, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
            table[n] = b as u8;
            n += 1;
        }
        b += 1;
    }
    table
};

static BYTE_CHARS: [char; 256] = {
    let mut table = ['\0'; 256];
    let mut shifted = 0u32;
    let mut b = 0usize;
    while b < 256 {
        let byte = b as u8;
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b] = if printable {
            byte as char
        } else {
            let c = match char::from_u32(0x100 + shifted) {
                Some(c) => c,
                None => '\0',
            };
            shifted += 1;
            c
        };
        b += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_known_spellings() {
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(byte_to_char(b)), Some(b));
        }
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'a'), 'a');
        assert_eq!(char_to_byte('▁'), None);
        assert_eq!(char_to_byte('\u{0144}'), None);
    }
}
