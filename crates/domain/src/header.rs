//! Header text as it goes on the wire: display names as RFC 5322 phrases, text that is not
//! plain ASCII (or that looks like an encoded word) as RFC 2047 encoded words, and lines folded
//! between words at 78 characters. Directory data is full of names like `Doe, John (Ops) "JD"`:
//! each must come out of a strict reader exactly as it went in.

use base64::Engine as _;

/// The longest encoded word Panel writes: RFC 2047 allows 75, and a line holding one at most
/// 76 (2), so that `Reply-To: ` and a word fit on the header's first line.
const MAX_ENCODED_WORD: usize = 64;
/// `=?utf-8?b?` and `?=`.
const ENCODED_WORD_OVERHEAD: usize = 12;

/// `atext` of RFC 5322 3.2.3: what a display name may carry without quotes.
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c)
}

/// Whether `text` must go as encoded words: it is not printable ASCII, or it holds `=?`,
/// which a reader would decode as an encoded word of its own (text that merely looks like one
/// is encoded, so that it reads as written).
fn needs_encoding(text: &str) -> bool {
    text.contains("=?") || text.chars().any(|c| !(c == ' ' || c.is_ascii_graphic()))
}

/// `text` as RFC 2047 `B` encoded words in UTF-8, each at most 64 characters and holding whole
/// characters, to be separated by folding white space (which readers drop between them).
pub fn encoded_words(text: &str) -> Vec<String> {
    // Base64 of up to 39 bytes is 52 characters: with the overhead, 64.
    let max_bytes = (MAX_ENCODED_WORD - ENCODED_WORD_OVERHEAD) / 4 * 3;
    let mut words = Vec::new();
    let mut start = 0;
    let mut end = 0;
    for (i, c) in text.char_indices() {
        if i + c.len_utf8() - start > max_bytes {
            words.push(&text[start..end]);
            start = i;
        }
        end = i + c.len_utf8();
    }
    if start < text.len() {
        words.push(&text[start..]);
    }
    words
        .into_iter()
        .map(|chunk| format!("=?utf-8?b?{}?=", base64::engine::general_purpose::STANDARD.encode(chunk)))
        .collect()
}

/// A display name as the words of an RFC 5322 `phrase`: atoms as they are; other printable
/// ASCII as one quoted-string with `"` and `\` escaped (3.2.4); anything else as encoded words,
/// which stand outside quotes (RFC 2047 5(3)), carrying the name's own characters unescaped.
pub fn phrase(name: &str) -> Vec<String> {
    if needs_encoding(name) {
        return encoded_words(name);
    }
    let words: Vec<&str> = name.split(' ').filter(|w| !w.is_empty()).collect();
    if words.iter().all(|w| w.chars().all(is_atext)) && words.join(" ") == name {
        return words.into_iter().map(String::from).collect();
    }
    let mut quoted = String::with_capacity(name.len() + 2);
    quoted.push('"');
    for c in name.chars() {
        if matches!(c, '"' | '\\') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    vec![quoted]
}

/// Unstructured text (a Subject) as header words: as it is when plain ASCII, else encoded.
/// `None` means the text needs nothing (the caller keeps its usual header).
pub fn unstructured(text: &str) -> Option<Vec<String>> {
    needs_encoding(text).then(|| encoded_words(text))
}

/// Joins `words` after `name: ` with single spaces, starting a new line (CRLF and a space)
/// before a word that would pass column 78 (RFC 5322 2.1.1, 2.2.3). Unfolding restores the
/// single spaces.
pub fn fold(name: &str, words: &[String]) -> String {
    let mut out = String::new();
    let mut column = name.len() + 2;
    for (i, word) in words.iter().enumerate() {
        if i > 0 {
            if column + 1 + word.len() > 78 {
                out.push_str("\r\n ");
                column = 1;
            } else {
                out.push(' ');
                column += 1;
            }
        }
        out.push_str(word);
        column += word.len();
    }
    out
}

/// The inverse of `phrase` for a display name as typed: a whole quoted-string (`"Doe, John"`)
/// loses its quotes and escapes; anything else is the name as written, quotes included.
pub fn unquote(name: &str) -> String {
    let inner = name.strip_prefix('"').and_then(|n| n.strip_suffix('"'));
    let Some(inner) = inner.filter(|i| !i.is_empty() || name.len() == 2) else { return name.to_string() };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(escaped) => out.push(escaped),
                None => return name.to_string(),
            },
            // A bare quote inside means it was not one quoted-string: keep it as written.
            '"' => return name.to_string(),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_atoms_quoted_strings_or_encoded_words() {
        assert_eq!(phrase("Identity Panel"), ["Identity", "Panel"]);
        assert_eq!(phrase(r#"Doe, John (Ops) "JD""#), [r#""Doe, John (Ops) \"JD\"""#]);
        assert_eq!(phrase(r"back\slash"), [r#""back\\slash""#]);
        assert_eq!(phrase("Jörg"), ["=?utf-8?b?SsO2cmc=?="]);
        assert_eq!(phrase("=?utf-8?q?x?="), ["=?utf-8?b?PT91dGYtOD9xP3g/PQ==?="]);
        assert_eq!(phrase("two  spaces"), [r#""two  spaces""#], "exact spacing is kept");
    }

    #[test]
    fn encoded_words_stay_within_64_characters_and_split_between_characters() {
        let long = "Grüße aus Köln, ".repeat(10);
        let words = encoded_words(&long);
        assert!(words.len() > 1);
        let mut back = String::new();
        for w in &words {
            assert!(w.len() <= 64, "{w}");
            let b64 = w.strip_prefix("=?utf-8?b?").unwrap().strip_suffix("?=").unwrap();
            let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
            back.push_str(std::str::from_utf8(&bytes).expect("whole characters in each word"));
        }
        assert_eq!(back, long);
    }

    #[test]
    fn folding_keeps_lines_within_78_and_only_breaks_between_words() {
        let words: Vec<String> = encoded_words(&"ü".repeat(200));
        let folded = fold("Subject", &words);
        for line in ("Subject: ".to_string() + &folded).split("\r\n") {
            assert!(line.len() <= 78, "{line}");
        }
        assert_eq!(folded.replace("\r\n ", " "), words.join(" "));
    }

    #[test]
    fn typed_names_lose_only_whole_quotes() {
        assert_eq!(unquote(r#""Doe, John""#), "Doe, John");
        assert_eq!(unquote(r#""say \"hi\"""#), r#"say "hi""#);
        assert_eq!(unquote(r#"Doe, John (Ops) "JD""#), r#"Doe, John (Ops) "JD""#, "not one quoted-string");
        assert_eq!(unquote(r#""JD" Doe "x""#), r#""JD" Doe "x""#);
    }
}
