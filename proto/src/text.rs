//! Text that came from the network, made safe to show: which characters a
//! user id may hold, and escaping for logs and terminals.
//!
//! A user id is 1 to 128 bytes of UTF-8 with no whitespace, no control
//! characters (Unicode category Cc) and no format characters (Cf: zero-width
//! characters, bidirectional controls, the byte-order mark, ...). Those
//! would let two ids look alike, reorder what is shown around them, or
//! forge fields and lines where they are printed.

/// Whether `c` is a Unicode format character (general category Cf, Unicode
/// 15.1): invisible, yet it changes how the text around it is shown.
pub fn is_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{0600}'..='\u{0605}'
            | '\u{061C}'
            | '\u{06DD}'
            | '\u{070F}'
            | '\u{0890}'..='\u{0891}'
            | '\u{08E2}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{110BD}'
            | '\u{110CD}'
            | '\u{13430}'..='\u{1343F}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0001}'
            | '\u{E0020}'..='\u{E007F}'
    )
}

/// Whether `c` may not appear in a user id: whitespace (including the line
/// and paragraph separators), control or format characters.
pub fn is_refused_in_id(c: char) -> bool {
    c.is_whitespace() || c.is_control() || is_format(c)
}

/// Whether `c` must be shown escaped: control and format characters, and
/// the line and paragraph separators.
pub fn is_unsafe_to_show(c: char) -> bool {
    c.is_control() || is_format(c) || matches!(c, '\u{2028}' | '\u{2029}')
}

/// `text` with every character that is unsafe to show written as a Rust
/// escape (`\n`, `\u{1b}`, `\u{202e}`), so that it cannot move the cursor,
/// clear a screen, set a window title, reorder text or start a new line.
/// Backslashes are doubled, so an escape in the output is always ours.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| c == '\\' || is_unsafe_to_show(c)) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    push_escaped(&mut out, text);
    std::borrow::Cow::Owned(out)
}

fn push_escaped(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_unsafe_to_show(c) => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
}

/// A value for a `key=value` log line: as is when it is one plain word,
/// otherwise in double quotes with quotes, backslashes and unsafe characters
/// escaped, so that no value can look like another field or another line.
pub fn log_value(value: &str) -> std::borrow::Cow<'_, str> {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '"' | '=' | '\\') || is_unsafe_to_show(c));
    if plain {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            c => push_escaped(&mut out, c.encode_utf8(&mut [0; 4])),
        }
    }
    out.push('"');
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_refuse_invisible_and_reordering_characters() {
        for c in [
            ' ', '\n', '\u{2028}', '\u{202E}', '\u{200B}', '\u{FEFF}', '\u{1b}', '\u{85}',
        ] {
            assert!(is_refused_in_id(c), "{c:?}");
        }
        for c in ['a', 'é', '中', '-', '_', '.', '@', '😀'] {
            assert!(!is_refused_in_id(c), "{c:?}");
        }
    }

    #[test]
    fn escaping_leaves_no_control_or_format_character() {
        let hostile = "\u{1b}[2J\u{1b}]0;pwned\u{7}\r\nFINISH \u{202E}olleh\\";
        let shown = escape(hostile);
        assert!(!shown.chars().any(is_unsafe_to_show), "{shown}");
        assert_eq!(
            shown,
            "\\u{1b}[2J\\u{1b}]0;pwned\\u{7}\\r\\nFINISH \\u{202e}olleh\\\\"
        );
        assert_eq!(escape("plain text, é"), "plain text, é");
    }

    #[test]
    fn log_values_cannot_pose_as_fields() {
        assert_eq!(log_value("alice"), "alice");
        assert_eq!(
            log_value(r#"x caller=victim code=0 event="START""#),
            r#""x caller=victim code=0 event=\"START\"""#
        );
        assert_eq!(log_value(""), r#""""#);
        assert_eq!(log_value("a\nb"), r#""a\nb""#);
    }
}
