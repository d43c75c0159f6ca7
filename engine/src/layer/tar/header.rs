//! One 512-byte tar header block: field access, number decoding (octal and
//! GNU base-256) and the checksum, for v7, ustar, star and GNU layouts.

/// Size of a tar block.
pub const BLOCK: usize = 512;

/// The header layouts this parser tells apart by their magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Unix v7: no magic, no prefix, no owner names.
    V7,
    /// POSIX ustar (and PAX, which is ustar plus extension headers).
    Ustar,
    /// ustar with star's 131-byte prefix (trailer "tar\0" at 508).
    Star,
    /// GNU tar's "ustar  \0" layout: no prefix, sparse map and atime instead.
    Gnu,
}

/// A borrowed header block.
pub struct Header<'b>(pub &'b [u8; BLOCK]);

/// Returns the bytes of a NUL-terminated (or full-width) string field.
pub fn cstr(field: &[u8]) -> &[u8] {
    match field.iter().position(|&b| b == 0) {
        Some(n) => &field[..n],
        None => field,
    }
}

/// Whether every byte of the block is zero (an end-of-archive block).
pub fn is_zero(block: &[u8]) -> bool {
    block.iter().all(|&b| b == 0)
}

/// Parses a numeric header field: octal digits padded with spaces or NULs,
/// or GNU base-256 (first byte 0x80 positive, 0xff negative, big-endian).
/// An all-blank field is 0. Returns an error text on malformed or
/// overflowing values.
pub fn parse_number(field: &[u8]) -> Result<i64, String> {
    if let Some(&first) = field.first() {
        if first & 0x80 != 0 {
            return parse_base256(field);
        }
    }
    // Octal: optional leading spaces/NULs, digits, then spaces/NULs only.
    let s = field;
    let start = s
        .iter()
        .position(|&b| b != b' ' && b != 0)
        .unwrap_or(s.len());
    let s = &s[start..];
    let end = s
        .iter()
        .position(|&b| b == b' ' || b == 0)
        .unwrap_or(s.len());
    let (digits, rest) = s.split_at(end);
    if rest.iter().any(|&b| b != b' ' && b != 0) {
        return Err(format!(
            "invalid octal field {:?}",
            String::from_utf8_lossy(field)
        ));
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !(b'0'..=b'7').contains(&d) {
            return Err(format!(
                "invalid octal field {:?}",
                String::from_utf8_lossy(field)
            ));
        }
        v = v
            .checked_mul(8)
            .and_then(|v| v.checked_add(u64::from(d - b'0')))
            .ok_or_else(|| "octal field overflows".to_string())?;
    }
    i64::try_from(v).map_err(|_| "octal field overflows".to_string())
}

fn parse_base256(field: &[u8]) -> Result<i64, String> {
    let negative = field[0] & 0x40 != 0;
    // Two's complement over the whole field with the marker bit cleared
    // (0x80 positive) or kept as sign (0xff negative).
    let mut v: i128 = if negative { -1 } else { 0 };
    // Header number fields are at most 12 bytes (96 bits), so i128 holds
    // any of them; the range check is at the end.
    if field.len() > 15 {
        return Err("base-256 field too long".to_string());
    }
    for (i, &b) in field.iter().enumerate() {
        let b = if i == 0 && !negative { b & 0x7f } else { b };
        v = (v << 8) | i128::from(b);
    }
    i64::try_from(v).map_err(|_| "base-256 field overflows".to_string())
}

impl<'b> Header<'b> {
    /// The layout, from magic and version.
    pub fn format(&self) -> Format {
        let magic = &self.0[257..263];
        let version = &self.0[263..265];
        if magic == b"ustar " && version == b" \0" {
            Format::Gnu
        } else if magic == b"ustar\0" {
            if &self.0[508..512] == b"tar\0" {
                Format::Star
            } else {
                Format::Ustar
            }
        } else {
            Format::V7
        }
    }

    /// Verifies the header checksum: the sum of all bytes with the checksum
    /// field counted as spaces, either unsigned (POSIX) or signed (some old
    /// tars), must equal the stored octal value.
    pub fn check_checksum(&self) -> Result<(), String> {
        let stored = parse_number(&self.0[148..156])?;
        let mut unsigned: i64 = 0;
        let mut signed: i64 = 0;
        for (i, &b) in self.0.iter().enumerate() {
            let b = if (148..156).contains(&i) { b' ' } else { b };
            unsigned += i64::from(b);
            signed += i64::from(b as i8);
        }
        if stored == unsigned || stored == signed {
            Ok(())
        } else {
            Err(format!(
                "checksum mismatch: stored {stored}, computed {unsigned}"
            ))
        }
    }

    /// The type flag byte.
    pub fn typeflag(&self) -> u8 {
        self.0[156]
    }

    /// The name, joined with the ustar/star prefix where the layout has one.
    pub fn name(&self) -> Vec<u8> {
        let name = cstr(&self.0[0..100]);
        let prefix = match self.format() {
            Format::Ustar => cstr(&self.0[345..500]),
            Format::Star => cstr(&self.0[345..476]),
            _ => &[],
        };
        if prefix.is_empty() {
            name.to_vec()
        } else {
            let mut v = Vec::with_capacity(prefix.len() + 1 + name.len());
            v.extend_from_slice(prefix);
            v.push(b'/');
            v.extend_from_slice(name);
            v
        }
    }

    /// The link name field.
    pub fn linkname(&self) -> Vec<u8> {
        cstr(&self.0[157..257]).to_vec()
    }

    /// A numeric field by its byte range, with the field's name for errors.
    pub fn num(&self, range: std::ops::Range<usize>, what: &str) -> Result<i64, String> {
        parse_number(&self.0[range]).map_err(|e| format!("{what}: {e}"))
    }

    /// Mode bits (permissions, setuid/setgid/sticky; the type bits some
    /// writers add are dropped).
    pub fn mode(&self) -> Result<u32, String> {
        let m = self.num(100..108, "mode")?;
        Ok((m & 0o7777) as u32)
    }

    /// Owner user ID.
    pub fn uid(&self) -> Result<i64, String> {
        self.num(108..116, "uid")
    }

    /// Owner group ID.
    pub fn gid(&self) -> Result<i64, String> {
        self.num(116..124, "gid")
    }

    /// The size field (may be overridden by PAX `size`).
    pub fn size(&self) -> Result<i64, String> {
        self.num(124..136, "size")
    }

    /// Modification time in seconds.
    pub fn mtime(&self) -> Result<i64, String> {
        self.num(136..148, "mtime")
    }

    /// Device major and minor numbers (0 where the layout has none).
    pub fn device(&self) -> Result<(i64, i64), String> {
        if self.format() == Format::V7 {
            return Ok((0, 0));
        }
        Ok((
            self.num(329..337, "devmajor")?,
            self.num(337..345, "devminor")?,
        ))
    }

    /// GNU layout: access time (0 if absent).
    pub fn gnu_atime(&self) -> Result<i64, String> {
        self.num(345..357, "atime")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octal_forms() {
        assert_eq!(parse_number(b"0000644\0").unwrap(), 0o644);
        assert_eq!(parse_number(b"   644 \0").unwrap(), 0o644);
        assert_eq!(parse_number(b"\0\0\0\0").unwrap(), 0);
        assert_eq!(parse_number(b"        ").unwrap(), 0);
        assert!(parse_number(b"0006x4\0").is_err());
        assert!(parse_number(b"64 4\0").is_err());
        assert!(parse_number(b"7777777777777777777777777").is_err());
    }

    #[test]
    fn base256_forms() {
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[11] = 0x01;
        f[10] = 0x02;
        assert_eq!(parse_number(&f).unwrap(), 0x0201);
        let neg = [0xffu8; 12];
        assert_eq!(parse_number(&neg).unwrap(), -1);
        let mut big = [0xffu8; 12];
        big[0] = 0x80;
        assert!(parse_number(&big).is_err());
        let mut max = [0u8; 12];
        max[0] = 0x80;
        max[4] = 0x7f;
        for b in &mut max[5..] {
            *b = 0xff;
        }
        assert_eq!(parse_number(&max).unwrap(), i64::MAX);
    }
}
