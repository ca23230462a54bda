//! `cel_string` renders any string as a single-quoted CEL literal that denotes exactly it: read
//! back by the CEL grammar's escape rules and by a CEL interpreter, it is the same string.
#![no_main]

use agentguard::cluster::webhook::cel_string;

libfuzzer_sys::fuzz_target!(|s: &str| {
    let literal = cel_string(s);
    assert_eq!(unquote(&literal).as_deref(), Some(s), "{literal}");
    // A CEL implementation reads it alike.
    let program = cel::Program::compile(&literal).unwrap_or_else(|e| panic!("{literal}: {e}"));
    let value = program.execute(&cel::Context::default()).expect("a literal evaluates");
    assert_eq!(value, cel::Value::String(s.to_owned().into()), "{literal}");
});

/// Reads a single-quoted, non-raw, single-line CEL string literal (cel-spec, "String and Bytes
/// Values"), or `None` when `literal` is not exactly one such literal. Raw newlines and
/// unescaped quotes or backslashes end or break a literal, so they are refused.
fn unquote(literal: &str) -> Option<String> {
    let inner = literal.strip_prefix('\'')?.strip_suffix('\'')?;
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '\n' | '\r' => return None,
            '\\' => match chars.next()? {
                '\\' => out.push('\\'),
                '\'' => out.push('\''),
                '"' => out.push('"'),
                '`' => out.push('`'),
                '?' => out.push('?'),
                'a' => out.push('\u{7}'),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                'v' => out.push('\u{b}'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    (hex.len() == 4).then_some(())?;
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                _ => return None,
            },
            // cel_string writes control characters and non-space whitespace escaped only.
            c if c.is_control() || (c.is_whitespace() && c != ' ') => return None,
            c => out.push(c),
        }
    }
    Some(out)
}
