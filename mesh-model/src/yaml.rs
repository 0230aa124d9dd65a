//! YAML as fleetmesh reads and writes it (manifests, peer configs, CRDs, meshctl's files): serde-saphyr, the YAML
//! crate kube itself uses, with YAML 1.2 core scalars, as serde_yaml had them: `yes`, `on`, `0755` and `1_000`
//! are strings, not booleans or numbers. Errors give the line and column.

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use serde_saphyr::{Error, SerializeError};

/// The reading options: YAML 1.2 core scalars, duplicate keys refused, errors without a source snippet (messages
/// stay one line, with the position). No limit on the number of documents, nodes or events: those grow with the
/// file (serde-saphyr's defaults, 1,024 documents and 250,000 nodes, are below a fleet's manifests; the scale
/// bench's file has 1,002 documents); what amplifies a file, aliases, keeps serde-saphyr's limits.
#[must_use]
pub fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
        with_snippet: false,
        budget: serde_saphyr::budget! {
            max_documents: usize::MAX,
            max_nodes: usize::MAX,
            max_events: usize::MAX,
        },
    }
}

/// One YAML document into `T`.
///
/// # Errors
/// Malformed YAML, or values that do not fit `T` (with their line and column).
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, Error> {
    serde_saphyr::from_str_with_options(text, options())
}

/// As [`from_str`], from bytes (UTF-8).
///
/// # Errors
/// As [`from_str`], and bytes that are not UTF-8.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    serde_saphyr::from_slice_with_options(bytes, options())
}

/// `value` as one YAML document. A string keeps its lines: one line stays one (quoted when needed, never folded),
/// several become a literal block (`|`).
///
/// # Errors
/// When `value` cannot be serialized (maps with keys that are not scalars).
pub fn to_string<T: Serialize>(value: &T) -> Result<String, SerializeError> {
    serde_saphyr::to_string_with_options(
        value,
        serde_saphyr::ser_options! { folded_wrap_chars: usize::MAX },
    )
}

/// A non-empty document of a multi-document file.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// Line where its content starts (its number in the file: [`document_number`]).
    pub line: u64,
    pub value: serde_json::Value,
}

/// A multi-document file that is not YAML, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DocumentError {
    /// 1-based index of the document (0 when unknown).
    pub document: usize,
    /// 1-based position (0 when unknown); `message` says it too.
    pub line: u64,
    pub column: u64,
    pub message: String,
}

/// Every non-empty document of `text`, as JSON values (what Kubernetes objects are), with the line where each
/// starts.
///
/// # Errors
/// The first document that is not YAML (or has duplicate keys): its number, line and column.
pub fn documents(text: &str) -> Result<Vec<Document>, DocumentError> {
    let docs: Vec<serde_saphyr::Spanned<serde_json::Value>> =
        serde_saphyr::from_str_multiple_with_options(text, options()).map_err(|e| {
            let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            DocumentError {
                document: if line == 0 { 0 } else { document_number(text, line) },
                line,
                column,
                message: e.to_string(),
            }
        })?;
    Ok(docs
        .into_iter()
        .map(|d| Document {
            line: d.referenced.line(),
            value: d.value,
        })
        .collect())
}

/// The 1-based number, empty documents counted, of the document of `text` that holds `line`: how many documents
/// start (with `---`, or with their first content) at or before it. It parses `text` again, up to its first
/// syntax error: for error messages, not for every document.
#[must_use]
pub fn document_number(text: &str, line: u64) -> usize {
    use serde_saphyr::granit_parser::{Event, Parser};
    Parser::new_from_str(text)
        .map_while(Result::ok)
        .filter(|(e, _)| matches!(e, Event::DocumentStart(..)))
        .take_while(|(_, span)| u64::try_from(span.start.line()).is_ok_and(|s| s <= line))
        .count()
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_numbered_as_in_the_file_empty_ones_counted() {
        let docs =
            documents("# a comment\na: 1\n---\n# empty\n---\nb: [1, 2]\n---\n---\nc: x\n").expect("yaml");
        let text = "# a comment\na: 1\n---\n# empty\n---\nb: [1, 2]\n---\n---\nc: x\n";
        let got: Vec<(usize, u64, String)> = docs
            .iter()
            .map(|d| (document_number(text, d.line), d.line, d.value.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                (1, 2, r#"{"a":1}"#.to_owned()),
                (3, 6, r#"{"b":[1,2]}"#.to_owned()),
                (5, 9, r#"{"c":"x"}"#.to_owned()),
            ]
        );
        // A file that starts with `---` has no empty document before it.
        let text = "---\na: 1\n---\nb: 2\n";
        let docs = documents(text).expect("yaml");
        let numbers: Vec<usize> = docs.iter().map(|d| document_number(text, d.line)).collect();
        assert_eq!(numbers, [1, 2]);
    }

    #[test]
    fn a_syntax_error_names_its_document_line_and_column() {
        let e = documents("a: 1\n---\n---\nb: 2\n---\nc: [1,\n").expect_err("unclosed");
        assert_eq!((e.document, e.line, e.column), (4, 6, 4), "{e}");
        assert!(e.message.contains("line 6, column 4"), "{e}");
        let e = documents("a: 1\n---\nb: 1\nb: 2\n").expect_err("duplicate key");
        assert_eq!((e.document, e.line), (2, 4), "{e}");
        assert!(e.message.contains("duplicate"), "{e}");
    }

    #[test]
    fn large_files_read() {
        // More documents and more nodes than serde-saphyr's default budget allows.
        let text = "---\nkind: Service\nmetadata: {name: s}\n".repeat(1_100);
        let docs = documents(&text).expect("1,100 documents");
        assert_eq!((docs.len(), docs[1_099].line), (1_100, 3 * 1_099 + 2));
        let text = format!("x: [{}1]\n", "1, ".repeat(260_000));
        let v: serde_json::Value = from_str(&text).expect("260,001 nodes");
        assert_eq!(v["x"].as_array().map(Vec::len), Some(260_001));
    }

    #[test]
    fn scalars_are_yaml_1_2_core() {
        let v: serde_json::Value =
            from_str("a: yes\nb: on\nc: 0755\nd: 1_000\ne: true\nf: 12\ng: 1.5\nh: ~\n").expect("yaml");
        assert_eq!(
            v,
            serde_json::json!({"a": "yes", "b": "on", "c": "0755", "d": "1_000", "e": true, "f": 12, "g": 1.5, "h": null})
        );
        assert!(from_str::<bool>("yes").is_err());
    }

    #[test]
    fn written_yaml_reads_back() {
        let long = "a long line, ".repeat(10);
        let v = serde_json::json!({
            "a": "yes", "b": ["1", 2, "x: y"], "c": {"d": null, "e": "0755"}, "f": "", "g": "two\nlines", "h": long,
        });
        let text = to_string(&v).expect("serializes");
        assert_eq!(from_str::<serde_json::Value>(&text).expect("reads"), v, "{text}");
        // The 9 lines above, `g: |-` and its two lines, `h` on one line.
        assert_eq!(text.lines().count(), 13, "{text}");
    }
}
