//! DM attribute names (`dm_attrname_t`): exactly [`DM_ATTR_NAME_SIZE`] opaque bytes.

use core::fmt;

/// DM_ATTR_NAME_SIZE: the length of every DM attribute name on the wire.
pub const DM_ATTR_NAME_SIZE: usize = 8;

/// Why [`attr_name`] refused a name.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttrNameError {
    /// The name is empty.
    Empty,
    /// The name is longer than [`DM_ATTR_NAME_SIZE`] bytes.
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The name has a byte that is not printable ASCII (`!` ..= `~`; no spaces).
    NotPrintable,
}

impl fmt::Display for AttrNameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrNameError::Empty => f.write_str("empty DM attribute name"),
            AttrNameError::TooLong { len } => write!(
                f,
                "DM attribute name of {len} bytes (at most {DM_ATTR_NAME_SIZE})"
            ),
            AttrNameError::NotPrintable => {
                f.write_str("DM attribute name with non-printable or non-ASCII bytes")
            }
        }
    }
}

impl std::error::Error for AttrNameError {}

/// The wire form of a printable DM attribute name: its bytes padded with NUL to exactly
/// [`DM_ATTR_NAME_SIZE`] bytes, as the host's `dm-host` functions require (other lengths are
/// refused there with `einval`).
///
/// ```
/// use strata_plugin_sdk::attr_name;
///
/// assert_eq!(attr_name("stratloc").unwrap(), b"stratloc");
/// assert_eq!(attr_name("loc").unwrap(), b"loc\0\0\0\0\0");
/// assert!(attr_name("far-too-long").is_err());
/// ```
pub fn attr_name(name: &str) -> Result<Vec<u8>, AttrNameError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() {
        return Err(AttrNameError::Empty);
    }
    if bytes.len() > DM_ATTR_NAME_SIZE {
        return Err(AttrNameError::TooLong { len: bytes.len() });
    }
    if !bytes.iter().all(u8::is_ascii_graphic) {
        return Err(AttrNameError::NotPrintable);
    }
    let mut out = bytes.to_vec();
    out.resize(DM_ATTR_NAME_SIZE, 0);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_to_eight_bytes() {
        assert_eq!(attr_name("a").unwrap(), b"a\0\0\0\0\0\0\0");
        assert_eq!(attr_name("12345678").unwrap().len(), DM_ATTR_NAME_SIZE);
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(attr_name(""), Err(AttrNameError::Empty));
        assert_eq!(
            attr_name("123456789"),
            Err(AttrNameError::TooLong { len: 9 })
        );
        assert_eq!(attr_name("a b"), Err(AttrNameError::NotPrintable));
        assert_eq!(attr_name("é"), Err(AttrNameError::NotPrintable));
        assert_eq!(attr_name("a\0"), Err(AttrNameError::NotPrintable));
    }
}
