//! The serde encoding of what travels between nodes and of the commands kept in the log:
//! postcard (varint integers, length-prefixed sequences, no field names), a maintained format.
//! It replaced bincode 1.3, which is no longer maintained, with protocol version 8 and log
//! record version 2.
//!
//! A value must fill its bytes exactly: a value followed by bytes it does not account for is
//! an error here, where `postcard::from_bytes` would ignore them.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why bytes do not decode as the value asked for.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DecodeError {
    /// The bytes are not an encoding of the value (cut short, an unknown variant, a length
    /// past the end, ...).
    #[error("{0}")]
    Malformed(#[from] postcard::Error),
    /// The value ends before the bytes do.
    #[error("{0} bytes left over after the value")]
    TrailingBytes(usize),
}

/// Encodes `value` at the end of `out` (which keeps its bytes if the encoding fails).
pub(crate) fn append<T: Serialize + ?Sized>(
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), postcard::Error> {
    let start = out.len();
    let result = postcard::serialize_with_flavor(value, AppendTo(out));
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// Encodes `value` into a new vector.
pub(crate) fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    let mut out = Vec::new();
    append(value, &mut out)?;
    Ok(out)
}

/// The length of `value`'s encoding, counted without writing it.
pub(crate) fn encoded_len<T: Serialize + ?Sized>(value: &T) -> Result<usize, postcard::Error> {
    postcard::serialize_with_flavor(value, Count(0))
}

/// Decodes a value that fills `bytes` exactly.
pub(crate) fn decode_whole<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (value, rest) = postcard::take_from_bytes(bytes)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

/// A postcard output that appends to a vector the caller keeps (postcard's own vector
/// output starts a new one).
struct AppendTo<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for AppendTo<'_> {
    type Output = ();

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// A postcard output that only counts.
struct Count(usize);

impl postcard::ser_flavors::Flavor for Count {
    type Output = usize;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0 += data.len();
        Ok(())
    }

    fn try_push(&mut self, _: u8) -> postcard::Result<()> {
        self.0 += 1;
        Ok(())
    }

    fn finalize(self) -> postcard::Result<usize> {
        Ok(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_appends_after_what_is_there_and_decodes_only_whole() {
        let mut out = vec![9u8];
        let value = (300u32, "key".to_owned(), vec![1u8, 2]);
        append(&value, &mut out).unwrap();
        assert_eq!(out[0], 9);
        assert_eq!(encoded_len(&value).unwrap(), out.len() - 1);
        let decoded: (u32, String, Vec<u8>) = decode_whole(&out[1..]).unwrap();
        assert_eq!(decoded, (300, "key".to_owned(), vec![1, 2]));
        assert!(matches!(
            decode_whole::<(u32, String, Vec<u8>)>(&out[..out.len() - 1]),
            Err(DecodeError::Malformed(_))
        ));
        let mut longer = out[1..].to_vec();
        longer.push(0);
        assert!(matches!(
            decode_whole::<(u32, String, Vec<u8>)>(&longer),
            Err(DecodeError::TrailingBytes(1))
        ));
    }

    #[test]
    fn a_claimed_length_past_the_end_is_an_error_not_an_allocation() {
        // A vector that claims u32::MAX elements in five bytes.
        let bytes = [0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(decode_whole::<Vec<u64>>(&bytes).is_err());
        assert!(decode_whole::<bytes::Bytes>(&bytes).is_err());
    }
}
