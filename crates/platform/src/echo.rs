//! Echoing a client's input back (in a status, its details, or a log line): at most [`MAX_ECHO_CHARS`] of it. A
//! request may carry a megabyte where a name was expected; quoting it whole would send it back in the trailers
//! and write it into every log that sees the call.

use std::borrow::Cow;

/// The most characters of any input kiroku quotes.
pub const MAX_ECHO_CHARS: usize = 128;

/// `input`, or its first [`MAX_ECHO_CHARS`] characters followed by how much was left out.
pub fn clip(input: &str) -> Cow<'_, str> {
    match input.char_indices().nth(MAX_ECHO_CHARS) {
        None => Cow::Borrowed(input),
        Some((cut, _)) => Cow::Owned(format!("{}… ({} more bytes)", &input[..cut], input.len() - cut)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_kept_and_long_input_is_cut_on_a_character_boundary() {
        assert_eq!(clip("UserRegistered"), "UserRegistered");
        let exact = "x".repeat(MAX_ECHO_CHARS);
        assert_eq!(clip(&exact), exact.as_str());
        let long = "é".repeat(1_000_000);
        let clipped = clip(&long);
        assert!(clipped.chars().count() < MAX_ECHO_CHARS + 40, "{clipped}");
        assert!(clipped.starts_with(&"é".repeat(MAX_ECHO_CHARS)) && clipped.ends_with("more bytes)"));
    }
}
