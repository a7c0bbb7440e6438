//! rustbpe: learns the merges of a byte-level BPE tokenizer, fast, for nanochat.
//!
//! nanochat trains its tokenizer here and encodes with tiktoken: this crate only has to learn the
//! merges (and can encode, for testing). The rules are those of the Python reference
//! (`tests/bpe_reference.py`), which the tests check merge for merge:
//! - Text is split into chunks by a regex (GPT-4's pattern with digit runs capped at two);
//!   identical chunks are counted once with a weight. A chunk starts as its UTF-8 bytes (ids
//!   0..=255) and merges never cross chunk boundaries.
//! - The count of a pair is the weighted number of adjacent positions holding it (overlaps count).
//! - Each step merges the pair with the highest count, ties going to the smallest (left, right);
//!   the new id is 256 + step. Inside a chunk the merge goes left to right, without overlap.
//!
//! Speed comes from doing each step incrementally instead of recounting everything:
//! - chunk counting is parallel (rayon) with the GIL released, in buffers pulled from Python; the
//!   default pattern runs on the automata of regex-automata rather than on fancy-regex's backtracking
//!   (see `Splitter`), each rayon job with its own copy of the regex;
//! - pair counts live in a hash map, and a max-heap orders the candidate merges. Counts of
//!   existing pairs only ever fall (new pairs all contain the new token), so a heap entry can be
//!   stale only by being too high: pop, compare with the true count, re-queue if it changed
//!   ("lazy invalidation");
//! - an index pair -> words holding it means a merge touches only those words, and each touched
//!   word reports the pair-count deltas of its rewrite.
//!
//! Sections: helpers, algorithm, Python bindings, tests.

use std::cmp::Ordering;

use ahash::AHashMap;
use compact_str::CompactString;
use dary_heap::OctonaryHeap;
use log::{info, warn};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rayon::prelude::*;
use regex_automata::{Anchored, Input};

/// GPT-4's (cl100k) split pattern with digit runs capped at two (`\p{N}{1,2}` instead of `{1,3}`).
pub const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// GPT4_PATTERN without possessive quantifiers and look-ahead, which regex-automata (the engine of
/// the `regex` crate) lacks; `Splitter` adds the one fix-up that makes its chunks those of GPT4_PATTERN.
const GPT4_PATTERN_DFA: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+";

type Pair = (u32, u32);

/// For each pair, the ids of the words that hold it (or held it: a later merge may have used it up),
/// each word listed once. A Vec, not a set: a pair gains words only in the merge step that creates
/// its newer token (after that, neither token is new), so a word is pushed only while it is being
/// rewritten, and checking the last entry is enough to list it once.
type WhereFound = AHashMap<Pair, Vec<u32>>;

// ------------------------------------------------------------------------------------------------
// Helpers

/// One distinct chunk of text, as token ids (initially its bytes).
#[derive(Clone, Debug)]
struct Word {
    ids: Vec<u32>,
}

impl Word {
    fn new(chunk: &str) -> Self {
        Word { ids: chunk.bytes().map(u32::from).collect() }
    }

    fn pairs(&self) -> impl Iterator<Item = Pair> + '_ {
        self.ids.windows(2).map(|w| (w[0], w[1]))
    }

    /// Replace every occurrence of `pair` (left to right, no overlap) by `new_id`, in place. Reports
    /// each change to this word's pair counts to `on_delta(pair, ±1)` (not yet weighted).
    fn merge_pair(&mut self, pair: Pair, new_id: u32, mut on_delta: impl FnMut(Pair, i64)) {
        let (a, b) = pair;
        let ids = &mut self.ids;
        let n = ids.len();
        let (mut read, mut write) = (0, 0); // write <= read: the input ahead is never overwritten
        while read < n {
            if read + 1 < n && ids[read] == a && ids[read + 1] == b {
                // The left neighbour is read from the output (it may be a token merged just
                // before), the right one from the input (a following merge reports its own side).
                if write > 0 {
                    let left = ids[write - 1];
                    on_delta((left, a), -1);
                    on_delta((left, new_id), 1);
                }
                on_delta(pair, -1);
                if read + 2 < n {
                    let right = ids[read + 2];
                    on_delta((b, right), -1);
                    on_delta((new_id, right), 1);
                }
                ids[write] = new_id;
                read += 2;
            } else {
                ids[write] = ids[read];
                read += 1;
            }
            write += 1;
        }
        ids.truncate(write);
    }
}

/// A candidate merge in the heap: higher count first, then the smaller pair.
#[derive(Debug, PartialEq, Eq)]
struct MergeJob {
    count: i64,
    pair: Pair,
}

impl Ord for MergeJob {
    fn cmp(&self, other: &Self) -> Ordering {
        self.count.cmp(&other.count).then_with(|| other.pair.cmp(&self.pair))
    }
}

impl PartialOrd for MergeJob {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn add_counts<K: std::hash::Hash + Eq>(into: &mut AHashMap<K, i64>, from: AHashMap<K, i64>) {
    for (k, v) in from {
        *into.entry(k).or_insert(0) += v;
    }
}

/// Splits text into chunks. fancy-regex runs any pattern, but its backtracking VM took most of the
/// training time; the default pattern runs on regex-automata's lazy DFA instead (chunk counting
/// ~5x faster), as GPT4_PATTERN_DFA:
/// - possessive quantifiers become plain ones: giving characters back could never change a match
///   here (the optional character before `\p{L}+` is not a letter; `[\r\n]*` cannot fail);
/// - `\s+(?!\S)|\s+` becomes `\s+`, which takes a whole run of spaces, where the look-ahead
///   leaves the run's last character to the next chunk if one follows (" word" keeps its space).
///   Only `\s+` ends a chunk with a space other than \r or \n (`\s*[\r\n]` ends with a newline,
///   the rest with a non-space), so `for_each_chunk` gives that character back.
/// Every character is a letter, a digit, a space or something else, and some alternative takes each,
/// so the chunks tile the text: each search is anchored where the last chunk ended, and runs
/// forwards only (an unanchored search also runs backwards to find where the match starts).
/// The tests check both splitters agree on tricky text, and the Python tests check the merges.
#[derive(Clone)]
enum Splitter {
    Fancy(fancy_regex::Regex),
    Gpt4(regex_automata::meta::Regex),
}

impl Splitter {
    fn new(pattern: &str) -> Result<Self, String> {
        let invalid = |e: &dyn std::fmt::Display| format!("invalid split pattern {pattern:?}: {e}");
        if pattern == GPT4_PATTERN {
            return regex_automata::meta::Regex::new(GPT4_PATTERN_DFA).map(Splitter::Gpt4).map_err(|e| invalid(&e));
        }
        fancy_regex::Regex::new(pattern).map(Splitter::Fancy).map_err(|e| invalid(&e))
    }

    /// Call `f` on each chunk of `text`, in order.
    fn for_each_chunk<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) -> Result<(), String> {
        match self {
            Splitter::Fancy(re) => {
                for m in re.find_iter(text) {
                    f(m.map_err(|e| format!("splitting text with the pattern failed: {e}"))?.as_str());
                }
            }
            Splitter::Gpt4(re) => {
                let mut start = 0;
                while start < text.len() {
                    let input = Input::new(text).range(start..).anchored(Anchored::Yes);
                    let Some(m) = re.search(&input) else {
                        return Err(format!("no chunk of the split pattern starts at byte {start}")); // cannot happen
                    };
                    let chunk = &text[start..m.end()];
                    let mut end = m.end();
                    if end < text.len() {
                        // A run of 2+ spaces before more text: give its last character back
                        // (char::is_whitespace and `\s` are both Unicode's White_Space).
                        if let Some((last_at, last)) = chunk.char_indices().next_back() {
                            if last_at > 0 && last.is_whitespace() && last != '\r' && last != '\n' {
                                end = start + last_at;
                            }
                        }
                    }
                    f(&text[start..end]);
                    start = end;
                }
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// Algorithm

/// Count the regex chunks of `texts`, in parallel.
fn count_chunks(texts: &[String], splitter: &Splitter) -> Result<AHashMap<CompactString, i64>, String> {
    texts
        .par_iter()
        // Each rayon job gets its own clone of the regex: a clone has its own matching caches,
        // while one shared regex makes the threads queue for its cache pool.
        .try_fold(
            || (AHashMap::new(), splitter.clone()),
            |(mut counts, splitter), text| {
                splitter.for_each_chunk(text, |chunk| *counts.entry(CompactString::from(chunk)).or_insert(0) += 1)?;
                Ok((counts, splitter))
            },
        )
        .map(|r| r.map(|(counts, _)| counts))
        .try_reduce(AHashMap::new, |mut a, b| {
            if a.len() < b.len() {
                return Ok({
                    let mut b = b;
                    add_counts(&mut b, a);
                    b
                });
            }
            add_counts(&mut a, b);
            Ok(a)
        })
}

/// Weighted pair counts over all words, and for each pair the words holding it (in parallel).
fn count_pairs(words: &[Word], counts: &[i64]) -> (AHashMap<Pair, i64>, WhereFound) {
    words
        .par_iter()
        .enumerate()
        .fold(
            || (AHashMap::new(), AHashMap::new()),
            |(mut pair_counts, mut where_found): (AHashMap<Pair, i64>, WhereFound), (i, word)| {
                for pair in word.pairs() {
                    *pair_counts.entry(pair).or_insert(0) += counts[i];
                    let holders = where_found.entry(pair).or_default();
                    if holders.last() != Some(&(i as u32)) {
                        holders.push(i as u32);
                    }
                }
                (pair_counts, where_found)
            },
        )
        .reduce(
            || (AHashMap::new(), AHashMap::new()),
            |(mut counts_a, mut where_a), (counts_b, where_b)| {
                add_counts(&mut counts_a, counts_b);
                for (pair, words) in where_b {
                    where_a.entry(pair).or_default().extend(words); // other words: no repeats
                }
                (counts_a, where_a)
            },
        )
}

/// The merge loop: up to `num_merges` merges, in order, as (pair, new id).
fn learn_merges(words: &mut [Word], counts: &[i64], num_merges: u32) -> Vec<(Pair, u32)> {
    let (mut pair_counts, mut where_found) = count_pairs(words, counts);
    let mut heap: OctonaryHeap<MergeJob> = pair_counts
        .iter()
        .filter(|(_, &count)| count > 0)
        .map(|(&pair, &count)| MergeJob { count, pair })
        .collect();
    info!("rustbpe: {} distinct chunks, {} distinct pairs; learning {} merges", words.len(), pair_counts.len(), num_merges);

    let mut merges: Vec<(Pair, u32)> = Vec::with_capacity(num_merges as usize);
    let mut last_percent = 0;
    while (merges.len() as u32) < num_merges {
        let Some(mut job) = heap.pop() else {
            warn!("rustbpe: no pairs left after {} merges (asked for {}): the text is too small", merges.len(), num_merges);
            break;
        };
        let current = pair_counts.get(&job.pair).copied().unwrap_or(0);
        if job.count != current {
            // Stale entry (the pair's count fell since it was queued): re-queue at its true count.
            if current > 0 {
                job.count = current;
                heap.push(job);
            }
            continue;
        }
        let new_id = 256 + merges.len() as u32;
        merges.push((job.pair, new_id));

        // Rewrite the words holding the pair; collect the pairs that the merge creates (the pairs
        // that gain counts all contain new_id, so they are new: their word lists start empty).
        let mut created: Vec<Pair> = Vec::new();
        for i in where_found.remove(&job.pair).unwrap_or_default() {
            let weight = counts[i as usize];
            words[i as usize].merge_pair(job.pair, new_id, |pair, delta| {
                *pair_counts.entry(pair).or_insert(0) += delta * weight;
                if delta > 0 {
                    let holders = where_found.entry(pair).or_default();
                    if holders.is_empty() {
                        created.push(pair);
                    }
                    if holders.last() != Some(&i) {
                        holders.push(i);
                    }
                }
            });
        }
        pair_counts.remove(&job.pair);
        for pair in created {
            let count = pair_counts[&pair];
            if count > 0 {
                heap.push(MergeJob { count, pair });
            }
        }

        let percent = merges.len() * 100 / num_merges as usize;
        if percent > last_percent {
            last_percent = percent;
            info!("rustbpe: {}% ({}/{} merges), last merge {:?} -> {} (count {})", percent, merges.len(), num_merges, job.pair, new_id, job.count);
        }
    }
    merges
}

// ------------------------------------------------------------------------------------------------
// Python bindings

/// A byte-level BPE tokenizer: train it, read its merges, encode with it.
#[pyclass]
pub struct Tokenizer {
    pattern: String,
    splitter: Splitter,
    merges: Vec<(Pair, u32)>,
    ranks: AHashMap<Pair, u32>,
}

impl Tokenizer {
    fn with_merges(pattern: &str, merges: Vec<(Pair, u32)>) -> Result<Self, String> {
        let splitter = Splitter::new(pattern)?;
        let ranks = merges.iter().copied().collect();
        Ok(Tokenizer { pattern: pattern.to_string(), splitter, merges, ranks })
    }

    /// Train on already-collected texts (the Rust-side entry point; Python streams instead).
    pub fn train(texts: &[String], vocab_size: u32, pattern: &str) -> Result<Self, String> {
        if vocab_size < 256 {
            return Err(format!("vocab_size must be at least 256 (the byte tokens), got {vocab_size}"));
        }
        let splitter = Splitter::new(pattern)?;
        let counts = count_chunks(texts, &splitter)?;
        Ok(Self::from_chunk_counts(counts, vocab_size, pattern)?)
    }

    fn from_chunk_counts(counts: AHashMap<CompactString, i64>, vocab_size: u32, pattern: &str) -> Result<Self, String> {
        if counts.len() > u32::MAX as usize {
            return Err(format!("{} distinct chunks: more than the 2^32 this trainer indexes", counts.len()));
        }
        let (mut words, weights): (Vec<Word>, Vec<i64>) = counts.into_iter().map(|(chunk, n)| (Word::new(&chunk), n)).unzip();
        let merges = learn_merges(&mut words, &weights, vocab_size - 256);
        Self::with_merges(pattern, merges)
    }

    /// Token ids of one chunk: repeatedly merge the lowest-id pair present.
    fn encode_chunk(&self, chunk: &str) -> Vec<u32> {
        let mut word = Word::new(chunk);
        while word.ids.len() >= 2 {
            let best = word.pairs().filter_map(|pair| self.ranks.get(&pair).map(|&id| (id, pair))).min();
            let Some((new_id, pair)) = best else { break };
            word.merge_pair(pair, new_id, |_, _| {});
        }
        word.ids
    }

    pub fn encode_text(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        // The pattern matched during training on the same engine; a failure here is a
        // backtracking limit (custom patterns) on pathological input: fall back to encoding the raw text.
        match self.splitter.for_each_chunk(text, |chunk| out.extend(self.encode_chunk(chunk))) {
            Ok(()) => out,
            Err(_) => self.encode_chunk(text),
        }
    }

    /// The bytes of every token id, 0..vocab.
    fn token_bytes(&self) -> Vec<Vec<u8>> {
        let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for &((left, right), _) in &self.merges {
            let mut token = vocab[left as usize].clone();
            token.extend_from_slice(&vocab[right as usize]);
            vocab.push(token);
        }
        vocab
    }
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn py_new() -> Self {
        Self::with_merges(GPT4_PATTERN, Vec::new()).expect("the default pattern compiles")
    }

    /// Learn vocab_size - 256 merges from an iterable of str. Texts are pulled `buffer_size` at a
    /// time (with the GIL), then split and counted in parallel with the GIL released.
    #[pyo3(signature = (iterator, vocab_size, buffer_size=8192, pattern=None))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: u32,
        buffer_size: usize,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(PyValueError::new_err(format!("vocab_size must be at least 256 (the byte tokens), got {vocab_size}")));
        }
        if buffer_size == 0 {
            return Err(PyValueError::new_err("buffer_size must be at least 1"));
        }
        let pattern = pattern.unwrap_or_else(|| GPT4_PATTERN.to_string());
        let splitter = Splitter::new(&pattern).map_err(PyValueError::new_err)?;
        let mut texts = iterator
            .iter()
            .map_err(|_| PyTypeError::new_err("train_from_iterator expects an iterable of str"))?;

        let mut counts: AHashMap<CompactString, i64> = AHashMap::new();
        let mut buffer: Vec<String> = Vec::with_capacity(buffer_size);
        let mut seen = 0usize;
        loop {
            buffer.clear();
            while buffer.len() < buffer_size {
                let Some(item) = texts.next() else { break };
                let item = item?;
                let text: String = item.extract().map_err(|_| {
                    PyTypeError::new_err(format!("train_from_iterator expects str items; item {seen} is not a str"))
                })?;
                buffer.push(text);
                seen += 1;
            }
            if buffer.is_empty() {
                break;
            }
            let buffer_counts = py.allow_threads(|| count_chunks(&buffer, &splitter)).map_err(PyValueError::new_err)?;
            add_counts(&mut counts, buffer_counts);
            if buffer.len() < buffer_size {
                break;
            }
        }
        info!("rustbpe: counted chunks of {seen} texts");
        let trained = py
            .allow_threads(|| Tokenizer::from_chunk_counts(counts, vocab_size, &pattern))
            .map_err(PyValueError::new_err)?;
        *self = trained;
        Ok(())
    }

    /// The split pattern.
    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// [(token bytes, id)] for every token: the 256 bytes, then one per merge.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        self.token_bytes()
            .iter()
            .enumerate()
            .map(|(id, token)| (PyBytes::new_bound(py, token), id as u32))
            .collect()
    }

    /// Token ids of one text.
    fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_text(text)
    }

    /// Token ids of many texts, in parallel with the GIL released.
    fn batch_encode(&self, py: Python<'_>, texts: Vec<String>) -> Vec<Vec<u32>> {
        py.allow_threads(|| texts.par_iter().map(|text| self.encode_text(text)).collect())
    }
}

#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    pyo3_log::init(); // Rust `log` records go to Python's `logging` (logger "rustbpe")
    m.add_class::<Tokenizer>()?;
    m.add("GPT4_PATTERN", GPT4_PATTERN)?;
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Tests (PYO3_PYTHON=$(which python) cargo test)

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn merge_pair_reports_exact_deltas() {
        // "aaaa" holds (a,a) 3 times; merging gives [N, N], which holds (N,N) once.
        let mut word = Word { ids: vec![1, 1, 1, 1] };
        let mut net: AHashMap<Pair, i64> = AHashMap::new();
        word.merge_pair((1, 1), 9, |pair, d| *net.entry(pair).or_insert(0) += d);
        assert_eq!(word.ids, vec![9, 9]);
        net.retain(|_, d| *d != 0);
        let expected: AHashMap<Pair, i64> = [((1, 1), -3), ((9, 9), 1)].into_iter().collect();
        assert_eq!(net, expected);
    }

    #[test]
    fn overlapping_pairs_merge_left_to_right() {
        let mut word = Word { ids: vec![1, 1, 1] };
        word.merge_pair((1, 1), 9, |_, _| {});
        assert_eq!(word.ids, vec![9, 1]);
    }

    #[test]
    fn most_frequent_pair_first_then_smallest_pair_on_ties() {
        // chunks: "aaa" (a,a)x2; " aaa" (space,a)x1 (a,a)x2; " abab" ...
        let tok = Tokenizer::train(&texts(&["aaa aaa abab"]), 260, GPT4_PATTERN).unwrap();
        let a = b'a' as u32;
        let b = b'b' as u32;
        let sp = b' ' as u32;
        assert_eq!(tok.merges, vec![((a, a), 256), ((a, b), 257), ((256, a), 258), ((sp, 257), 259)]);
    }

    #[test]
    fn ties_go_to_the_smallest_pair() {
        // (c,d) and (a,b) both occur once: (a,b) is smaller, so it goes first.
        let tok = Tokenizer::train(&texts(&["cd", "ab"]), 258, GPT4_PATTERN).unwrap();
        assert_eq!(tok.merges[0].0, (b'a' as u32, b'b' as u32));
        assert_eq!(tok.merges[1].0, (b'c' as u32, b'd' as u32));
    }

    #[test]
    fn stops_early_when_no_pairs_are_left() {
        let tok = Tokenizer::train(&texts(&["ab"]), 1000, GPT4_PATTERN).unwrap();
        assert_eq!(tok.merges.len(), 1);
    }

    #[test]
    fn encode_round_trips_and_uses_merges() {
        let corpus = "the cat sat on the mat. the cat ate the rat! 12345 😀 naïve 東京";
        let tok = Tokenizer::train(&texts(&[corpus]), 300, GPT4_PATTERN).unwrap();
        let vocab = tok.token_bytes();
        for text in [corpus, "the theme", "", "😀😀 x"] {
            let ids = tok.encode_text(text);
            let bytes: Vec<u8> = ids.iter().flat_map(|&id| vocab[id as usize].clone()).collect();
            assert_eq!(bytes, text.as_bytes());
        }
        assert!(tok.encode_text("the cat").len() < "the cat".len());
    }

    fn chunks<'t>(splitter: &Splitter, text: &'t str) -> Vec<&'t str> {
        let mut out = Vec::new();
        splitter.for_each_chunk(text, |chunk| out.push(chunk)).unwrap();
        out
    }

    #[test]
    fn digits_split_in_runs_of_at_most_two() {
        let splitter = Splitter::new(GPT4_PATTERN).unwrap();
        assert!(matches!(splitter, Splitter::Gpt4(_)));
        assert_eq!(chunks(&splitter, "12345"), vec!["12", "34", "5"]);
        assert_eq!(chunks(&splitter, "a  b\t\tc   "), vec!["a", " ", " b", "\t", "\tc", "   "]);
    }

    #[test]
    fn fast_splitter_equals_fancy_regex_on_tricky_text() {
        // The GPT-4 pattern on fancy-regex (what it means) vs the rewrite on the regex crate.
        let fancy = Splitter::Fancy(fancy_regex::Regex::new(GPT4_PATTERN).unwrap());
        let fast = Splitter::new(GPT4_PATTERN).unwrap();
        // Spaces of every kind (incl. NBSP, ideographic, NEL, line separator, zero-width non-space),
        // newlines, letters (incl. long s and Kelvin, which case-fold to s and k), digits, symbols.
        let alphabet: Vec<&str> = vec![
            " ", " ", "  ", "\t", "\n", "\r", "\r\n", "\u{a0}", "\u{3000}", "\u{85}", "\u{2028}", "\u{200b}",
            "a", "Z", "é", "東", "ſ", "\u{212a}", "s", "t", "ll", "VE", "'", "1", "٣", "²", "!", ".", "😀", "-", "$",
        ];
        let mut seed: u64 = 42;
        let mut next = |n: usize| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as usize % n
        };
        let mut cases: Vec<String> = vec![
            "Hello  world!\n\n  It's 2024; we'LL see.\t\tx \u{a0}y\u{3000}\u{3000}z   ".into(),
            " \n \r\n\t \u{85} a".into(),
            "".into(),
        ];
        for _ in 0..3000 {
            let len = 1 + next(24);
            cases.push((0..len).map(|_| alphabet[next(alphabet.len())]).collect());
        }
        for text in &cases {
            assert_eq!(chunks(&fast, text), chunks(&fancy, text), "text {text:?}");
        }
    }

    #[test]
    fn rejects_small_vocab_and_bad_pattern() {
        assert!(Tokenizer::train(&texts(&["x"]), 100, GPT4_PATTERN).is_err());
        assert!(Tokenizer::train(&texts(&["x"]), 300, "(").is_err());
    }
}
