//! Embeddings made ahead of a step, looked up by text: a cluster job's embedding shards embed
//! the texts of the prepare step on every worker, and the node that runs the step reads them from
//! an [`EmbeddingTable`] through a [`TableEmbedder`] instead of embedding them again.
//!
//! The table's file form (one blob): the magic `RAGDEMB1`, the width (u32, little-endian), the
//! row count (u64), then per row the BLAKE3 hash of the text (32 bytes) and its vector (`dim`
//! little-endian f32). Reading checks the magic, that the length matches exactly, that no vector
//! holds a NaN or an infinity and that no text appears twice.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::embed::{EmbedError, Embedder};

const MAGIC: &[u8; 8] = b"RAGDEMB1";
/// The widest vector a table file may declare (no embedding model comes near it).
const MAX_DIM: usize = 1 << 16;
const HEADER_LEN: usize = 8 + 4 + 8;

/// Embedding-table errors.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The bytes are not an embedding table.
    #[error("not an embedding table ({what}); the file is damaged or of another kind")]
    Malformed {
        /// What is wrong.
        what: String,
    },
    /// A vector of another width than the table's.
    #[error("a vector of {got} dimensions for a table of {expected}")]
    Width {
        /// The table's width.
        expected: usize,
        /// The vector's.
        got: usize,
    },
}

/// The key of a text in a table.
pub fn text_key(text: &str) -> [u8; 32] {
    *blake3::hash(text.as_bytes()).as_bytes()
}

/// Vectors by text (see the module docs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EmbeddingTable {
    dim: usize,
    keys: Vec<[u8; 32]>,
    data: Vec<f32>,
    row_of: HashMap<[u8; 32], usize>,
}

impl EmbeddingTable {
    /// An empty table of vectors `dim` wide.
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            ..Default::default()
        }
    }

    /// Vector width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of texts.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the table holds no text.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Adds the vector of `text` (a text already present keeps its first vector).
    pub fn insert(&mut self, text: &str, vector: &[f32]) -> Result<(), TableError> {
        self.insert_key(text_key(text), vector)
    }

    fn insert_key(&mut self, key: [u8; 32], vector: &[f32]) -> Result<(), TableError> {
        if vector.len() != self.dim {
            return Err(TableError::Width {
                expected: self.dim,
                got: vector.len(),
            });
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.row_of.entry(key) {
            e.insert(self.keys.len());
            self.keys.push(key);
            self.data.extend_from_slice(vector);
        }
        Ok(())
    }

    /// Adds every row of `other` (a text already present keeps its first vector).
    pub fn merge(&mut self, other: &EmbeddingTable) -> Result<(), TableError> {
        for (row, key) in other.keys.iter().enumerate() {
            self.insert_key(*key, &other.data[row * other.dim..(row + 1) * other.dim])?;
        }
        Ok(())
    }

    /// The vector of `text`, if the table has it.
    pub fn get(&self, text: &str) -> Option<&[f32]> {
        let row = *self.row_of.get(&text_key(text))?;
        Some(&self.data[row * self.dim..(row + 1) * self.dim])
    }

    /// The file form (see the module docs).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.len() * (32 + 4 * self.dim));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.dim as u32).to_le_bytes());
        out.extend_from_slice(&(self.len() as u64).to_le_bytes());
        for (row, key) in self.keys.iter().enumerate() {
            out.extend_from_slice(key);
            for x in &self.data[row * self.dim..(row + 1) * self.dim] {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        out
    }

    /// Reads the file form, checking it whole (see the module docs).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TableError> {
        let bad = |what: String| TableError::Malformed { what };
        if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
            return Err(bad("no RAGDEMB1 header".into()));
        }
        let dim = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
        let rows = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
        let row_len = 32 + 4 * dim;
        let expected = (rows as u128) * (row_len as u128) + HEADER_LEN as u128;
        if dim == 0 || dim > MAX_DIM || expected != bytes.len() as u128 {
            return Err(bad(format!(
                "{rows} rows of width {dim} need {expected} bytes, the file has {}",
                bytes.len()
            )));
        }
        let mut table = Self::new(dim);
        let mut vector = Vec::with_capacity(dim);
        for (i, row) in bytes[HEADER_LEN..].chunks_exact(row_len).enumerate() {
            let key: [u8; 32] = row[..32].try_into().expect("32 bytes");
            vector.clear();
            vector.extend(
                row[32..]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
            );
            if vector.iter().any(|x| !x.is_finite()) {
                return Err(bad(format!("row {i} holds a NaN or an infinity")));
            }
            if table.row_of.contains_key(&key) {
                return Err(bad(format!("row {i} repeats a text")));
            }
            table.insert_key(key, &vector)?;
        }
        Ok(table)
    }
}

/// The texts in `texts` (duplicates once), longest first, so that each shard of them (and each
/// batch within a shard) holds texts of similar lengths and pads little.
pub fn unique_longest_first(texts: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<String> = texts
        .into_iter()
        .filter(|t| seen.insert(text_key(t)))
        .collect();
    // Ties in a stable order, so the same inputs always cut the same shards.
    out.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    out
}

/// Cuts `texts` into consecutive shards of at most `max_texts` texts and `max_bytes` bytes (a
/// single longer text is a shard of its own).
pub fn shard_ranges(texts: &[String], max_texts: usize, max_bytes: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, t) in texts.iter().enumerate() {
        let full = i - start >= max_texts.max(1) || (i > start && bytes + t.len() > max_bytes);
        if full {
            out.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += t.len();
    }
    if start < texts.len() {
        out.push(start..texts.len());
    }
    out
}

/// An [`Embedder`] that reads vectors from a table and embeds only the texts it lacks, with
/// `fallback` (without one, a missing text is an error).
pub struct TableEmbedder {
    table: Arc<EmbeddingTable>,
    fallback: Option<Arc<dyn Embedder>>,
    name: String,
    missed: AtomicU64,
}

impl TableEmbedder {
    /// Reads from `table`; `name` goes to the manifest (the model that made the vectors).
    pub fn new(
        table: Arc<EmbeddingTable>,
        fallback: Option<Arc<dyn Embedder>>,
        name: String,
    ) -> Self {
        Self {
            table,
            fallback,
            name,
            missed: AtomicU64::new(0),
        }
    }

    /// How many texts were not in the table (embedded by the fallback).
    pub fn missed(&self) -> u64 {
        self.missed.load(Ordering::Relaxed)
    }
}

impl Embedder for TableEmbedder {
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut out: Vec<Option<Vec<f32>>> = texts
            .iter()
            .map(|t| self.table.get(t).map(<[f32]>::to_vec))
            .collect();
        let missing: Vec<usize> = (0..texts.len()).filter(|&i| out[i].is_none()).collect();
        if !missing.is_empty() {
            let Some(fallback) = &self.fallback else {
                return Err(EmbedError::Failed {
                    message: format!(
                        "{} texts are not in the embedding table and no model was given to embed them",
                        missing.len()
                    ),
                    source: None,
                });
            };
            self.missed
                .fetch_add(missing.len() as u64, Ordering::Relaxed);
            let batch: Vec<String> = missing.iter().map(|&i| texts[i].clone()).collect();
            let vectors = fallback.embed(&batch)?;
            if vectors.len() != batch.len() {
                return Err(EmbedError::CountMismatch {
                    expected: batch.len(),
                    got: vectors.len(),
                });
            }
            for (&i, v) in missing.iter().zip(vectors) {
                if v.len() != self.table.dim() && !self.table.is_empty() {
                    return Err(EmbedError::DimensionMismatch {
                        expected: self.table.dim(),
                        got: v.len(),
                    });
                }
                out[i] = Some(v);
            }
        }
        Ok(out.into_iter().map(|v| v.unwrap_or_default()).collect())
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::embed::HashingEmbedder;

    fn texts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_table_survives_its_file_form_and_damage_is_named() {
        let e = HashingEmbedder::new(16);
        let list = texts(&["how do I vacuum", "VACUUM reclaims dead tuples", "bash"]);
        let mut table = EmbeddingTable::new(16);
        for (t, v) in list.iter().zip(e.embed(&list).unwrap()) {
            table.insert(t, &v).unwrap();
        }
        let bytes = table.to_bytes();
        let back = EmbeddingTable::from_bytes(&bytes).unwrap();
        assert_eq!(back, table);
        assert_eq!(back.get("bash"), table.get("bash"));
        assert!(back.get("zsh").is_none());

        let truncated = EmbeddingTable::from_bytes(&bytes[..bytes.len() - 1]).unwrap_err();
        assert!(truncated.to_string().contains("need"), "{truncated}");
        let mut nan = bytes.clone();
        nan[super::HEADER_LEN + 32..super::HEADER_LEN + 36]
            .copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(EmbeddingTable::from_bytes(&nan).is_err());
        assert!(EmbeddingTable::from_bytes(b"{\"not\": \"a table\"}").is_err());
        let wrong = table.clone().insert("x", &[1.0]).unwrap_err();
        assert!(matches!(
            wrong,
            TableError::Width {
                expected: 16,
                got: 1
            }
        ));
    }

    #[test]
    fn the_table_embedder_embeds_only_what_the_table_lacks() {
        let e: Arc<dyn Embedder> = Arc::new(HashingEmbedder::new(32));
        let known = texts(&["alpha beta", "gamma delta"]);
        let mut table = EmbeddingTable::new(32);
        for (t, v) in known.iter().zip(e.embed(&known).unwrap()) {
            table.insert(t, &v).unwrap();
        }
        let table = Arc::new(table);
        let asked = texts(&["gamma delta", "epsilon", "alpha beta"]);
        let with = TableEmbedder::new(table.clone(), Some(e.clone()), "m".into());
        assert_eq!(with.embed(&asked).unwrap(), e.embed(&asked).unwrap());
        assert_eq!(with.missed(), 1);
        let without = TableEmbedder::new(table, None, "m".into());
        let err = without.embed(&asked).unwrap_err().to_string();
        assert!(
            err.contains("1 texts are not in the embedding table"),
            "{err}"
        );
    }

    #[test]
    fn shards_are_bounded_in_texts_and_bytes_and_cover_every_text() {
        let list = unique_longest_first(texts(&["bb", "a", "ccc", "a", "dddd", "ee"]));
        assert_eq!(list, texts(&["dddd", "ccc", "bb", "ee", "a"]));
        assert_eq!(shard_ranges(&list, 2, 100), vec![0..2, 2..4, 4..5]);
        assert_eq!(shard_ranges(&list, 10, 5), vec![0..1, 1..3, 3..5]);
        assert_eq!(
            shard_ranges(&list, 10, 1),
            vec![0..1, 1..2, 2..3, 3..4, 4..5]
        );
        assert!(shard_ranges(&[], 2, 2).is_empty());
    }
}
