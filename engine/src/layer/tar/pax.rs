//! PAX extended header records (`"%d %s=%s\n"`), and the decoding of their
//! values: decimal numbers, timestamps with sub-second precision, and the
//! xattr encodings of star (`SCHILY.xattr.`) and libarchive
//! (`LIBARCHIVE.xattr.`, %-encoded name and base64 value).

use base64::Engine as _;

/// One PAX record: key and raw value.
pub type Record = (Vec<u8>, Vec<u8>);

/// Parses the records of one PAX header's data. Records keep their order:
/// the GNU sparse 0.0 format repeats `GNU.sparse.offset` /
/// `GNU.sparse.numbytes` pairs.
pub fn parse_records(data: &[u8]) -> Result<Vec<Record>, String> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut at = 0usize;
    while !rest.is_empty() {
        // Some writers pad the data with NULs after the last record.
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| format!("record at byte {at}: no length"))?;
        let len_s = &rest[..sp];
        if len_s.is_empty() || len_s.len() > 20 || !len_s.iter().all(u8::is_ascii_digit) {
            return Err(format!(
                "record at byte {at}: bad length {:?}",
                String::from_utf8_lossy(len_s)
            ));
        }
        let len: usize = std::str::from_utf8(len_s)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("record at byte {at}: bad length"))?;
        if len <= sp + 1 || len > rest.len() {
            return Err(format!("record at byte {at}: length {len} out of range"));
        }
        let rec = &rest[sp + 1..len];
        if rec.last() != Some(&b'\n') {
            return Err(format!("record at byte {at}: not terminated by a newline"));
        }
        let rec = &rec[..rec.len() - 1];
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| format!("record at byte {at}: no '='"))?;
        let (k, v) = (&rec[..eq], &rec[eq + 1..]);
        if k.is_empty() {
            return Err(format!("record at byte {at}: empty key"));
        }
        out.push((k.to_vec(), v.to_vec()));
        rest = &rest[len..];
        at += len;
    }
    Ok(out)
}

/// A decimal integer value (uid, gid, size).
pub fn parse_decimal(key: &[u8], v: &[u8]) -> Result<i64, String> {
    let s = std::str::from_utf8(v).map_err(|_| bad(key, v))?;
    if s.is_empty()
        || !s
            .bytes()
            .enumerate()
            .all(|(i, b)| b.is_ascii_digit() || (i == 0 && b == b'-'))
    {
        return Err(bad(key, v));
    }
    s.parse::<i64>().map_err(|_| bad(key, v))
}

/// A timestamp `[-]SECONDS[.FRACTION]` as (seconds, nanoseconds), the
/// nanoseconds always non-negative (so -1.5 is (-2, 500000000)).
pub fn parse_time(key: &[u8], v: &[u8]) -> Result<(i64, u32), String> {
    let s = std::str::from_utf8(v).map_err(|_| bad(key, v))?;
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s),
    };
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) => (i, f),
        None => (body, ""),
    };
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad(key, v));
    }
    let secs: i64 = int.parse().map_err(|_| bad(key, v))?;
    let mut nanos: u32 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nanos += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
    }
    if !neg {
        return Ok((secs, nanos));
    }
    if nanos == 0 {
        Ok((-secs, 0))
    } else {
        Ok((-secs - 1, 1_000_000_000 - nanos))
    }
}

fn bad(key: &[u8], v: &[u8]) -> String {
    format!(
        "invalid value for {}: {:?}",
        String::from_utf8_lossy(key),
        String::from_utf8_lossy(v)
    )
}

/// The xattr (name, value) a record carries, if it is an xattr record.
pub fn xattr(key: &[u8], v: &[u8]) -> Result<Option<Record>, String> {
    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
        if name.is_empty() {
            return Err("empty SCHILY.xattr name".into());
        }
        return Ok(Some((name.to_vec(), v.to_vec())));
    }
    if let Some(enc) = key.strip_prefix(b"LIBARCHIVE.xattr.") {
        let name = percent_decode(enc).ok_or_else(|| bad(key, b""))?;
        if name.is_empty() {
            return Err("empty LIBARCHIVE.xattr name".into());
        }
        // libarchive writes base64 without padding; accept both.
        let trimmed: Vec<u8> = v.iter().copied().filter(|&b| b != b'=').collect();
        let value = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(&trimmed)
            .map_err(|_| bad(key, v))?;
        return Ok(Some((name, value)));
    }
    Ok(None)
}

fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            let h = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records() {
        let r = parse_records(b"30 mtime=1350244992.023960108\n17 path=a/b c=d\xff\n").unwrap();
        assert_eq!(r[0], (b"mtime".to_vec(), b"1350244992.023960108".to_vec()));
        assert_eq!(r[1], (b"path".to_vec(), b"a/b c=d\xff".to_vec()));
        assert!(parse_records(b"10 path=x").is_err());
        assert!(parse_records(b"5 a=b\n").is_err());
        assert!(parse_records(b"x path=a\n").is_err());
        assert!(parse_records(b"9 path=a\0").is_err());
        assert!(parse_records(b"99999999999999999999999 a=b\n").is_err());
    }

    #[test]
    fn times() {
        assert_eq!(
            parse_time(b"t", b"1350244992.023960108").unwrap(),
            (1350244992, 23960108)
        );
        assert_eq!(parse_time(b"t", b"5").unwrap(), (5, 0));
        assert_eq!(parse_time(b"t", b"-1.5").unwrap(), (-2, 500_000_000));
        assert_eq!(parse_time(b"t", b"1.1234567891").unwrap(), (1, 123456789));
        assert!(parse_time(b"t", b"1.x").is_err());
        assert!(parse_time(b"t", b"").is_err());
    }

    #[test]
    fn xattrs() {
        assert_eq!(
            xattr(b"SCHILY.xattr.user.a", b"v\0w").unwrap(),
            Some((b"user.a".to_vec(), b"v\0w".to_vec()))
        );
        assert_eq!(
            xattr(b"LIBARCHIVE.xattr.user.a%3Db", b"aGVsbG8").unwrap(),
            Some((b"user.a=b".to_vec(), b"hello".to_vec()))
        );
        assert_eq!(xattr(b"path", b"x").unwrap(), None);
    }
}
