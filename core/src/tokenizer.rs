//! torchtext's `basic_english` tokenizer, exactly, in one pass.
//!
//! torchtext lowercases the line, then applies twelve regex substitutions in order and splits
//! on whitespace:
//!
//! | pattern  | replacement |      | pattern | replacement |
//! |----------|-------------|------|---------|-------------|
//! | `'`      | `" '  "`    |      | `)`     | `" ) "`     |
//! | `"`      | `""`        |      | `!`     | `" ! "`     |
//! | `.`      | `" . "`     |      | `?`     | `" ? "`     |
//! | `<br />` | `" "`       |      | `;`     | `" "`       |
//! | `,`      | `" , "`     |      | `:`     | `" "`       |
//! | `(`      | `" ( "`     |      | `\s+`   | `" "`       |
//!
//! Since the result is split on whitespace, the padded replacements only make `'` `.` `,`
//! `(` `)` `!` `?` tokens of their own, and `;` `:` `<br />` separators. Deleting `"` can join
//! text into a new `<br />` (as in `<br "/>`), and no other substitution can create or break
//! one, so removing `"` first and then scanning once gives the same tokens.

/// Bump when the tokenizer's output changes: it is part of the encoded-corpus cache key.
pub const TOKENIZER_VERSION: &str = "basic_english-1";

/// Python's `str.isspace()`, which both `re`'s `\s` and `str.split()` use: Unicode
/// White_Space plus the ASCII separators U+001C..U+001F.
#[inline]
pub fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Reusable buffer: tokenizing many reviews with one `Tokenizer` allocates once.
#[derive(Default)]
pub struct Tokenizer {
    normalized: String,
}

impl Tokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls `emit` with each token of `text`, in order.
    pub fn for_each_token(&mut self, text: &str, mut emit: impl FnMut(&str)) {
        self.normalize(text);
        let s = self.normalized.as_str();
        let bytes = s.as_bytes();
        let mut start = 0usize; // start of the current token
        let mut i = 0usize;
        while i < bytes.len() {
            let b = bytes[i];
            if b < 0x80 {
                match b {
                    b'\'' | b'.' | b',' | b'(' | b')' | b'!' | b'?' => {
                        if start < i {
                            emit(&s[start..i]);
                        }
                        emit(&s[i..i + 1]);
                        i += 1;
                        start = i;
                    }
                    b';' | b':' | b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r' | 0x1c..=0x1f => {
                        if start < i {
                            emit(&s[start..i]);
                        }
                        i += 1;
                        start = i;
                    }
                    b'<' if bytes[i..].starts_with(b"<br />") => {
                        if start < i {
                            emit(&s[start..i]);
                        }
                        i += 6;
                        start = i;
                    }
                    _ => i += 1,
                }
            } else {
                // Non-ASCII: only Unicode whitespace separates.
                let c = s[i..].chars().next().unwrap_or(' ');
                let width = c.len_utf8();
                if is_python_space(c) {
                    if start < i {
                        emit(&s[start..i]);
                    }
                    start = i + width;
                }
                i += width;
            }
        }
        if start < bytes.len() {
            emit(&s[start..]);
        }
    }

    /// The tokens of `text` as owned strings (convenient for tests and `predict`).
    pub fn tokenize(&mut self, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        self.for_each_token(text, |t| out.push(t.to_string()));
        out
    }

    /// Lowercase as Python's `str.lower()` does, and delete `"`.
    fn normalize(&mut self, text: &str) {
        self.normalized.clear();
        if text.is_ascii() {
            self.normalized.reserve(text.len());
            self.normalized
                .extend(text.bytes().filter(|&b| b != b'"').map(|b| b.to_ascii_lowercase() as char));
        } else {
            // str::to_lowercase handles the context-dependent final sigma as Python does.
            let lower = text.to_lowercase();
            self.normalized.extend(lower.chars().filter(|&c| c != '"'));
        }
    }
}

/// One-shot convenience wrapper.
pub fn tokenize(text: &str) -> Vec<String> {
    Tokenizer::new().tokenize(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<String> {
        tokenize(s)
    }

    // Expected values worked out by hand from torchtext's regex list.
    #[test]
    fn punctuation_becomes_tokens_and_separators() {
        assert_eq!(toks("Hello, World!"), ["hello", ",", "world", "!"]);
        assert_eq!(toks("It's (really) good?"), ["it", "'", "s", "(", "really", ")", "good", "?"]);
        assert_eq!(toks("a;b:c"), ["a", "b", "c"]);
        assert_eq!(toks("end.  Next"), ["end", ".", "next"]);
        assert_eq!(toks("wait..."), ["wait", ".", ".", "."]);
    }

    #[test]
    fn double_quotes_are_deleted_not_split() {
        assert_eq!(toks("say \"hi\" now"), ["say", "hi", "now"]);
        assert_eq!(toks("ab\"cd"), ["abcd"]);
        assert_eq!(toks("\"\""), Vec::<String>::new());
    }

    #[test]
    fn line_breaks_are_separators_even_when_joined_by_quotes() {
        assert_eq!(toks("one<br /><br />two"), ["one", "two"]);
        assert_eq!(toks("A<BR />B"), ["a", "b"]);
        // Deleting the quote first forms a `<br />`, as the sequential regexes do.
        assert_eq!(toks("x<br \"/>y"), ["x", "y"]);
        // Not a line break: the pieces stay, with `/` and `>` inside tokens.
        assert_eq!(toks("<br/>"), ["<br/>"]);
        assert_eq!(toks("<br  />"), ["<br", "/>"]);
    }

    #[test]
    fn whitespace_is_python_whitespace() {
        assert_eq!(toks("a\tb\nc\u{a0}d\u{3000}e\u{1f}f"), ["a", "b", "c", "d", "e", "f"]);
        assert_eq!(toks("   "), Vec::<String>::new());
        // U+200B ZERO WIDTH SPACE is not whitespace for Python.
        assert_eq!(toks("a\u{200b}b"), ["a\u{200b}b"]);
    }

    #[test]
    fn unicode_lowercase_and_other_symbols_stay_inside_tokens() {
        assert_eq!(toks("CAFÉ Ölé"), ["café", "ölé"]);
        // Final sigma, as Python lowercases it.
        assert_eq!(toks("ΟΔΟΣ"), ["\u{3bf}\u{3b4}\u{3bf}\u{3c2}"]);
        assert_eq!(toks("5/10 -- $3 & co"), ["5/10", "--", "$3", "&", "co"]);
        assert_eq!(toks("don't"), ["don", "'", "t"]);
    }
}
