//! Sample keys and member names, following the WebDataset convention.
//!
//! WebDataset groups tar members into samples by key: the member name up to the first `.` of its
//! base name. A sample here has two members, `<key>.jpg` (the encoded image) and `<key>.cls` (the
//! class index as ASCII decimal). Keys are therefore restricted to characters that cannot split a
//! key (`[A-Za-z0-9_-]`) and short enough for a plain ustar name field.

/// Suffix of the image member.
pub const IMAGE_SUFFIX: &str = ".jpg";
/// Suffix of the label member.
pub const LABEL_SUFFIX: &str = ".cls";
/// Longest key in bytes: `<key>.jpg` must fit the 100-byte ustar name field.
pub const MAX_KEY_BYTES: usize = 96;

/// Checks that `key` is a valid sample key, and says what is wrong if not.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("key is empty".into());
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "key is {} bytes long, at most {MAX_KEY_BYTES} fit a tar member name",
            key.len()
        ));
    }
    if let Some(c) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "key contains {c:?}: only ASCII letters, digits, '_' and '-' are allowed"
        ));
    }
    Ok(())
}

/// Turns a file name into a key: the part before the first `.`, with every character outside
/// `[A-Za-z0-9_-]` replaced by `_` (`n01440764_10026.JPEG` gives `n01440764_10026`).
pub fn key_from_file_name(name: &str) -> String {
    let stem = name.split('.').next().unwrap_or("");
    stem.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_imagenet_names() {
        assert_eq!(
            key_from_file_name("n01440764_10026.JPEG"),
            "n01440764_10026"
        );
        assert_eq!(
            key_from_file_name("ILSVRC2012_val_00000001.JPEG"),
            "ILSVRC2012_val_00000001"
        );
        assert_eq!(key_from_file_name("a b+c.tar.gz"), "a_b_c");
    }

    #[test]
    fn bad_keys_are_rejected_with_a_reason() {
        assert!(check_key("n01440764_10026").is_ok());
        assert_eq!(check_key("").unwrap_err(), "key is empty");
        assert!(check_key("a.b").unwrap_err().contains("'.'"));
        assert!(check_key(&"x".repeat(97)).unwrap_err().contains("97 bytes"));
    }
}
