//! Splits MIL text into tokens, each with the line:column where it starts.
//!
//! Numbers are kept as written (`-1.5e-3`, `0x1.8p+1`, `-inf`): only the literal's
//! declared type says whether `2` is an int32 or an fp16, so the parser reads them.

use crate::ir::Span;
use crate::{mil_err, Result};

#[derive(Clone, Debug, PartialEq)]
pub(super) enum Tok {
    /// `main`, `tensor`, `fp16`, `true`, `inf`, `BLOBFILE`, …
    Ident(String),
    /// A number as written, sign included.
    Number(String),
    /// A string literal, escapes resolved.
    Str(String),
    /// One of `( ) [ ] { } < > , = ;`.
    Punct(char),
    /// `->`
    Arrow,
    Eof,
}

#[derive(Clone, Debug)]
pub(super) struct Token {
    pub tok: Tok,
    pub span: Span,
}

impl Tok {
    /// How an error message names this token: "`foo`", "number `1.5`", "end of input".
    pub fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("`{s}`"),
            Tok::Number(s) => format!("number `{s}`"),
            Tok::Str(s) => {
                let short: String = s.chars().take(24).collect();
                let more = if short.len() < s.len() { "…" } else { "" };
                format!("string \"{}{more}\"", short.escape_default())
            }
            Tok::Punct(c) => format!("`{c}`"),
            Tok::Arrow => "`->`".to_string(),
            Tok::Eof => "end of input".to_string(),
        }
    }
}

/// A cursor over the characters of the text that knows its line and column.
struct Cursor<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    line: u32,
    col: u32,
}

impl Cursor<'_> {
    fn peek(&mut self) -> Option<char> {
        self.chars.peek().copied()
    }

    /// The character after the next one (the lexer needs two characters of look-ahead
    /// for `->`, `//` and signed numbers).
    fn peek2(&self) -> Option<char> {
        let mut it = self.chars.clone();
        it.next();
        it.next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.chars.next()?;
        if c == '\n' {
            self.line = self.line.saturating_add(1);
            self.col = 1;
        } else {
            self.col = self.col.saturating_add(1);
        }
        Some(c)
    }

    fn span(&self) -> Span {
        Span::new(self.line, self.col)
    }
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Whether a sign at this point starts a number (`-1`, `-.5`, `-inf`, `-nan`) rather
/// than being an arrow or a stray character.
fn starts_signed_number(next: Option<char>) -> bool {
    matches!(next, Some(c) if c.is_ascii_digit() || c == '.' || c == 'i' || c == 'n')
}

/// The whole text as tokens, ending with [`Tok::Eof`].
pub(super) fn tokenize(text: &str) -> Result<Vec<Token>> {
    let mut cur = Cursor { chars: text.chars().peekable(), line: 1, col: 1 };
    let mut out = Vec::new();
    loop {
        // Whitespace and `//` comments separate tokens and are otherwise ignored.
        while let Some(c) = cur.peek() {
            if c.is_whitespace() {
                cur.bump();
            } else if c == '/' && cur.peek2() == Some('/') {
                while cur.peek().is_some_and(|c| c != '\n') {
                    cur.bump();
                }
            } else {
                break;
            }
        }
        let span = cur.span();
        let Some(c) = cur.peek() else {
            out.push(Token { tok: Tok::Eof, span });
            return Ok(out);
        };
        let tok = match c {
            '(' | ')' | '[' | ']' | '{' | '}' | '<' | '>' | ',' | '=' | ';' => {
                cur.bump();
                Tok::Punct(c)
            }
            '-' if cur.peek2() == Some('>') => {
                cur.bump();
                cur.bump();
                Tok::Arrow
            }
            '"' => Tok::Str(string(&mut cur, span)?),
            c if is_ident_start(c) => {
                let mut s = String::new();
                while let Some(c) = cur.peek().filter(|&c| is_ident_char(c)) {
                    s.push(c);
                    cur.bump();
                }
                Tok::Ident(s)
            }
            c if c.is_ascii_digit()
                || (c == '.' && cur.peek2().is_some_and(|d| d.is_ascii_digit()))
                || ((c == '-' || c == '+') && starts_signed_number(cur.peek2())) =>
            {
                Tok::Number(number(&mut cur))
            }
            other => {
                return Err(mil_err!(Syntax, "unexpected character `{}`", other.escape_default()).at(span));
            }
        };
        out.push(Token { tok, span });
    }
}

/// A number as written: an optional sign, then letters, digits, `.` and `_`, with a
/// sign allowed right after an exponent marker (`1e-5`, `0x1p+3`).
fn number(cur: &mut Cursor<'_>) -> String {
    let mut s = String::new();
    if let Some(sign) = cur.peek().filter(|&c| c == '-' || c == '+') {
        s.push(sign);
        cur.bump();
    }
    while let Some(c) = cur.peek() {
        let after_exponent = matches!(s.chars().last(), Some('e' | 'E' | 'p' | 'P'));
        if is_ident_char(c) || c == '.' || ((c == '+' || c == '-') && after_exponent) {
            s.push(c);
            cur.bump();
        } else {
            break;
        }
    }
    s
}

/// A `"…"` string; `\"`, `\\`, `\n`, `\r` and `\t` are the escapes.
fn string(cur: &mut Cursor<'_>, start: Span) -> Result<String> {
    cur.bump(); // the opening quote
    let mut s = String::new();
    loop {
        let here = cur.span();
        match cur.bump() {
            None => {
                return Err(mil_err!(
                    Syntax,
                    "unterminated string starting at {}:{}: expected `\"`, found end of input",
                    start.line,
                    start.col
                )
                .at(here))
            }
            Some('"') => return Ok(s),
            Some('\\') => match cur.bump() {
                Some('"') => s.push('"'),
                Some('\\') => s.push('\\'),
                Some('n') => s.push('\n'),
                Some('r') => s.push('\r'),
                Some('t') => s.push('\t'),
                Some(other) => {
                    return Err(mil_err!(
                        Syntax,
                        "unknown escape `\\{}` in a string (known: \\\" \\\\ \\n \\r \\t)",
                        other.escape_default()
                    )
                    .at(here))
                }
                None => return Err(mil_err!(Syntax, "unterminated string: input ends after `\\`").at(here)),
            },
            Some(c) => s.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(text: &str) -> Vec<Tok> {
        tokenize(text).unwrap().into_iter().map(|t| t.tok).collect()
    }

    #[test]
    fn numbers_keep_their_spelling() {
        assert_eq!(
            toks("-1.5e-3 0x1.8p+1 -inf 7"),
            vec![
                Tok::Number("-1.5e-3".into()),
                Tok::Number("0x1.8p+1".into()),
                Tok::Number("-inf".into()),
                Tok::Number("7".into()),
                Tok::Eof
            ]
        );
    }

    #[test]
    fn arrow_strings_and_comments() {
        assert_eq!(
            toks("} -> (y); // done\n\"a\\\"b\""),
            vec![
                Tok::Punct('}'),
                Tok::Arrow,
                Tok::Punct('('),
                Tok::Ident("y".into()),
                Tok::Punct(')'),
                Tok::Punct(';'),
                Tok::Str("a\"b".into()),
                Tok::Eof
            ]
        );
    }

    #[test]
    fn spans_are_one_based_and_count_characters() {
        let t = tokenize("\"é\" x\n  y").unwrap();
        assert_eq!((t[1].span.line, t[1].span.col), (1, 5));
        assert_eq!((t[2].span.line, t[2].span.col), (2, 3));
    }
}
