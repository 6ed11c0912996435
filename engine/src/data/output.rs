//! Outputs: training JSONL in ragd's F-058 layout, the held-out test set in BEIR layout
//! (`corpus.jsonl`, `queries.jsonl`, `qrels/test.tsv`), and a JSON manifest of the run.
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::chunk::Chunk;

/// Output errors.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// Writing a file failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Serialising failed.
    #[error("cannot serialise {what}: {source}")]
    Serialise {
        /// What was being written.
        what: String,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
}

/// A negative in a training record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NegativeRef {
    /// Chunk id.
    pub id: String,
    /// Chunk text.
    pub text: String,
}

/// One training record, ragd's F-058 layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainRecord {
    /// The query.
    pub query: String,
    /// The positive passage.
    pub positive: String,
    /// The positive's chunk id.
    pub positive_id: String,
    /// Hard negatives, hardest first.
    pub negatives: Vec<NegativeRef>,
    /// The positive's document.
    pub source_document: String,
}

/// A test query for the BEIR files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestQuery {
    /// Query id.
    pub id: String,
    /// Query text.
    pub text: String,
    /// The relevant chunk.
    pub chunk_id: String,
}

fn create(path: &Path) -> Result<BufWriter<fs::File>, OutputError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|source| OutputError::Write {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    fs::File::create(path)
        .map(BufWriter::new)
        .map_err(|source| OutputError::Write {
            path: path.to_path_buf(),
            source,
        })
}

fn write_lines<T: Serialize>(
    path: &Path,
    items: impl IntoIterator<Item = T>,
) -> Result<(), OutputError> {
    let mut w = create(path)?;
    let io = |source| OutputError::Write {
        path: path.to_path_buf(),
        source,
    };
    for item in items {
        serde_json::to_writer(&mut w, &item).map_err(|source| OutputError::Serialise {
            what: path.display().to_string(),
            source,
        })?;
        w.write_all(b"\n").map_err(io)?;
    }
    w.flush().map_err(io)
}

/// Writes training records as JSONL.
pub fn write_train(path: &Path, records: &[TrainRecord]) -> Result<(), OutputError> {
    write_lines(path, records)
}

/// Writes a BEIR test set under `dir`: every chunk in `corpus.jsonl` (`_id`, `title` = document id,
/// `text`), the queries in `queries.jsonl` (`_id`, `text`), and `qrels/test.tsv` with a header.
pub fn write_beir(dir: &Path, corpus: &[Chunk], queries: &[TestQuery]) -> Result<(), OutputError> {
    write_lines(
        &dir.join("corpus.jsonl"),
        corpus
            .iter()
            .map(|c| serde_json::json!({"_id": c.id, "title": c.document_id, "text": c.text})),
    )?;
    write_lines(
        &dir.join("queries.jsonl"),
        queries
            .iter()
            .map(|q| serde_json::json!({"_id": q.id, "text": q.text})),
    )?;
    let path = dir.join("qrels").join("test.tsv");
    let mut w = create(&path)?;
    let io = |source| OutputError::Write {
        path: path.clone(),
        source,
    };
    writeln!(w, "query-id\tcorpus-id\tscore").map_err(io)?;
    for q in queries {
        writeln!(w, "{}\t{}\t1", q.id, q.chunk_id).map_err(io)?;
    }
    w.flush().map_err(io)
}

/// One step's record in the manifest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Seconds the step took.
    pub seconds: f64,
    /// Counts, by name.
    pub counts: BTreeMap<String, u64>,
}

/// The run manifest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Tool that wrote it.
    pub tool: String,
    /// Generator kind (`ollama`, `openai`, `builtin`, `ict`).
    pub generator: String,
    /// Model used to generate.
    pub model: String,
    /// Endpoint, if any.
    pub endpoint: Option<String>,
    /// Prompt hash, if a prompt was used.
    pub prompt_hash: Option<String>,
    /// Embedder used for filtering and mining.
    pub embedder: String,
    /// Run seed.
    pub seed: u64,
    /// Settings, as given.
    pub settings: serde_json::Value,
    /// Steps in order, with counts and durations.
    pub steps: Vec<(String, StepRecord)>,
    /// Generator throughput, tokens per second (0 when not measured).
    pub tokens_per_second: f64,
    /// Training records written.
    pub train_records: usize,
    /// Test queries written.
    pub test_queries: usize,
    /// Total seconds.
    pub total_seconds: f64,
}

/// Writes the manifest as pretty JSON.
pub fn write_manifest(path: &Path, manifest: &Manifest) -> Result<(), OutputError> {
    let json = serde_json::to_string_pretty(manifest).map_err(|source| OutputError::Serialise {
        what: "manifest".into(),
        source,
    })?;
    fs::write(path, json + "\n").map_err(|source| OutputError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f058_and_beir_layouts() {
        let tmp = tempfile::tempdir().unwrap();
        let rec = TrainRecord {
            query: "What is MVCC?".into(),
            positive: "MVCC is ...".into(),
            positive_id: "a.md_chunk_0".into(),
            negatives: vec![NegativeRef {
                id: "b.md_chunk_1".into(),
                text: "WAL is ...".into(),
            }],
            source_document: "a.md".into(),
        };
        write_train(&tmp.path().join("train.jsonl"), std::slice::from_ref(&rec)).unwrap();
        let line = fs::read_to_string(tmp.path().join("train.jsonl")).unwrap();
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(v["positive_id"], "a.md_chunk_0");
        assert_eq!(v["negatives"][0]["id"], "b.md_chunk_1");
        assert_eq!(v["source_document"], "a.md");
        assert_eq!(serde_json::from_value::<TrainRecord>(v).unwrap(), rec);

        let chunks = vec![Chunk {
            id: "a.md_chunk_0".into(),
            document_id: "a.md".into(),
            text: "MVCC is ...".into(),
        }];
        let qs = vec![TestQuery {
            id: "q0".into(),
            text: "What is MVCC?".into(),
            chunk_id: "a.md_chunk_0".into(),
        }];
        let dir = tmp.path().join("test");
        write_beir(&dir, &chunks, &qs).unwrap();
        let corpus = fs::read_to_string(dir.join("corpus.jsonl")).unwrap();
        assert!(corpus.contains("\"_id\":\"a.md_chunk_0\""));
        let qrels = fs::read_to_string(dir.join("qrels/test.tsv")).unwrap();
        assert_eq!(qrels, "query-id\tcorpus-id\tscore\nq0\ta.md_chunk_0\t1\n");
        let m = Manifest {
            seed: 3,
            ..Default::default()
        };
        write_manifest(&tmp.path().join("manifest.json"), &m).unwrap();
        let back: Manifest =
            serde_json::from_str(&fs::read_to_string(tmp.path().join("manifest.json")).unwrap())
                .unwrap();
        assert_eq!(back.seed, 3);
    }
}
