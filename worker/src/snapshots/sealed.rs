//! The encrypted object format: a 64-byte header, then the payload in AES-256-GCM chunks under the STREAM
//! construction (each chunk's nonce carries its position and a last-chunk flag, so reordered, dropped or
//! truncated chunks fail authentication). Each object gets its own key, derived with HKDF from the snapshot
//! key, a random salt and the header, so a changed header fails too.
//!
//! ```text
//! magic "BSNAP\x01\0\0" | key id (8) | salt (32) | chunk size u32 BE | 12 zero bytes
//! chunk_1 .. chunk_n: chunk size + 16 bytes each | last chunk: shorter than a full one (possibly just its tag)
//! ```

use std::{
    fmt,
    io::{self, Read, Write},
};

use aes_gcm::{
    Aes256Gcm, KeyInit,
    aead::{
        generic_array::GenericArray,
        stream::{DecryptorBE32, EncryptorBE32},
    },
};
use hkdf::Hkdf;
use rand::RngCore;
use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"BSNAP\x01\0\0";
pub const HEADER_LEN: usize = 64;
const TAG_LEN: usize = 16;
/// 1 MiB of plaintext per chunk: large enough that the tags cost nothing, small enough to stream.
pub const DEFAULT_CHUNK: usize = 1 << 20;

/// The 32-byte key snapshots are sealed with (`berth gen-key` writes one).
#[derive(Clone)]
pub struct SnapshotKey {
    key: [u8; 32],
}

impl fmt::Debug for SnapshotKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotKey({})", self.id())
    }
}

impl SnapshotKey {
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    /// A public fingerprint of the key, stored in each object's header and row: a restore with another key
    /// says so instead of failing on the first chunk.
    pub fn id(&self) -> String {
        hex(&self.id_bytes())
    }

    /// What the start-up check compares (see [`broker::crypto::key_check_value`]).
    pub fn check_value(&self) -> [u8; 32] {
        broker::crypto::key_check_value(&self.key)
    }

    fn id_bytes(&self) -> [u8; 8] {
        let digest = Sha256::new()
            .chain_update(b"berth snapshot key id")
            .chain_update(self.key)
            .finalize();
        digest[..8].try_into().expect("8 bytes")
    }

    fn object_cipher(&self, header: &[u8; HEADER_LEN]) -> Aes256Gcm {
        let salt = &header[16..48];
        let hk = Hkdf::<Sha256>::new(Some(salt), &self.key);
        let mut okm = [0u8; 32];
        let mut info = b"berth snapshot v1".to_vec();
        info.extend_from_slice(header);
        hk.expand(&info, &mut okm)
            .expect("32 bytes is a valid HKDF length");
        Aes256Gcm::new(GenericArray::from_slice(&okm))
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why an object would not open. Carried inside `io::Error` through the decompressor and `pg_restore` copy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("the object is not a berth snapshot (bad header)")]
    NotASnapshot,
    #[error(
        "the object was sealed with snapshot key {object}, which this worker does not hold (its keys: {ours}); \
         add the key file with id {object} to SNAPSHOT_KEY_FILES"
    )]
    WrongKey { object: String, ours: String },
    #[error("the object is corrupted: chunk {0} failed authentication")]
    Corrupted(u64),
    #[error("the object is truncated: it ends after chunk {0} without its final chunk")]
    Truncated(u64),
    #[error("the object has bytes after its final chunk")]
    TrailingData,
}

impl From<OpenError> for io::Error {
    fn from(err: OpenError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, err)
    }
}

/// The [`OpenError`] inside an I/O error, if that is what it is.
pub fn open_error(err: &io::Error) -> Option<&OpenError> {
    err.get_ref().and_then(|e| e.downcast_ref::<OpenError>())
}

/// Encrypts everything written to it into `inner`. Call [`SealWriter::finish`] at the end: without the final
/// chunk the object reads as truncated.
pub struct SealWriter<W: Write> {
    inner: W,
    stream: Option<EncryptorBE32<Aes256Gcm>>,
    buf: Vec<u8>,
    chunk: usize,
}

impl<W: Write> SealWriter<W> {
    pub fn new(key: &SnapshotKey, mut inner: W, chunk: usize) -> io::Result<Self> {
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&key.id_bytes());
        rand::rngs::OsRng.fill_bytes(&mut header[16..48]);
        header[48..52].copy_from_slice(&(chunk as u32).to_be_bytes());
        inner.write_all(&header)?;
        // The per-object key is fresh, so a fixed nonce prefix never repeats under it.
        let stream = EncryptorBE32::from_aead(
            key.object_cipher(&header),
            GenericArray::from_slice(&[0u8; 7]),
        );
        Ok(Self {
            inner,
            stream: Some(stream),
            buf: Vec::with_capacity(chunk),
            chunk,
        })
    }

    fn seal_full_chunk(&mut self) -> io::Result<()> {
        let stream = self.stream.as_mut().expect("not finished");
        let sealed = stream
            .encrypt_next(self.buf.as_slice())
            .map_err(|_| io::Error::other("encrypting a snapshot chunk failed"))?;
        self.inner.write_all(&sealed)?;
        self.buf.clear();
        Ok(())
    }

    /// Writes the final chunk and hands back the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        if self.buf.len() == self.chunk {
            self.seal_full_chunk()?;
        }
        let stream = self.stream.take().expect("finish runs once");
        let sealed = stream
            .encrypt_last(self.buf.as_slice())
            .map_err(|_| io::Error::other("encrypting the last snapshot chunk failed"))?;
        self.inner.write_all(&sealed)?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for SealWriter<W> {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let total = data.len();
        while !data.is_empty() {
            // A full buffer is sealed only once more data arrives: the last chunk must be short.
            if self.buf.len() == self.chunk {
                self.seal_full_chunk()?;
            }
            let take = (self.chunk - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(total)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Decrypts an object written by [`SealWriter`], failing with an [`OpenError`] on a wrong key, a changed
/// byte, or a missing end.
pub struct OpenReader<R: Read> {
    inner: R,
    stream: Option<DecryptorBE32<Aes256Gcm>>,
    sealed_chunk: usize,
    plain: Vec<u8>,
    pos: usize,
    chunks: u64,
    done: bool,
}

impl<R: Read> OpenReader<R> {
    pub fn new(key: &SnapshotKey, inner: R) -> io::Result<Self> {
        Self::with_keys(std::slice::from_ref(key), inner)
    }

    /// Opens with whichever of `keys` the object's header names.
    pub fn with_keys(keys: &[SnapshotKey], mut inner: R) -> io::Result<Self> {
        let mut header = [0u8; HEADER_LEN];
        read_full(&mut inner, &mut header).and_then(|n| {
            if n == HEADER_LEN {
                Ok(())
            } else {
                Err(OpenError::NotASnapshot.into())
            }
        })?;
        if &header[..8] != MAGIC || header[52..].iter().any(|b| *b != 0) {
            return Err(OpenError::NotASnapshot.into());
        }
        let Some(key) = keys.iter().find(|k| header[8..16] == k.id_bytes()) else {
            return Err(OpenError::WrongKey {
                object: hex(&header[8..16]),
                ours: keys
                    .iter()
                    .map(SnapshotKey::id)
                    .collect::<Vec<_>>()
                    .join(", "),
            }
            .into());
        };
        let chunk = u32::from_be_bytes(header[48..52].try_into().expect("4 bytes")) as usize;
        if chunk == 0 || chunk > 64 << 20 {
            return Err(OpenError::NotASnapshot.into());
        }
        let stream = DecryptorBE32::from_aead(
            key.object_cipher(&header),
            GenericArray::from_slice(&[0u8; 7]),
        );
        Ok(Self {
            inner,
            stream: Some(stream),
            sealed_chunk: chunk + TAG_LEN,
            plain: Vec::new(),
            pos: 0,
            chunks: 0,
            done: false,
        })
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    fn next_chunk(&mut self) -> io::Result<()> {
        let mut sealed = vec![0u8; self.sealed_chunk];
        let n = read_full(&mut self.inner, &mut sealed)?;
        sealed.truncate(n);
        if n == 0 {
            return Err(OpenError::Truncated(self.chunks).into());
        }
        self.chunks += 1;
        let chunk_no = self.chunks;
        self.plain = if n == self.sealed_chunk {
            let stream = self.stream.as_mut().expect("not done");
            stream
                .decrypt_next(sealed.as_slice())
                .map_err(|_| OpenError::Corrupted(chunk_no))?
        } else {
            // A short chunk is the last one; a cut-off object fails here too (its tag does not match).
            let stream = self.stream.take().expect("not done");
            let plain = stream
                .decrypt_last(sealed.as_slice())
                .map_err(|_| OpenError::Corrupted(chunk_no))?;
            let mut extra = [0u8; 1];
            if read_full(&mut self.inner, &mut extra)? != 0 {
                return Err(OpenError::TrailingData.into());
            }
            self.done = true;
            plain
        };
        self.pos = 0;
        Ok(())
    }
}

impl<R: Read> Read for OpenReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.plain.len() {
            if self.done {
                return Ok(0);
            }
            self.next_chunk()?;
        }
        let n = (self.plain.len() - self.pos).min(out.len());
        out[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Reads until `buf` is full or the input ends; the count read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Counts and hashes the bytes that pass through (the stored object's size and SHA-256).
#[derive(Default)]
pub struct Digest256 {
    hasher: Sha256,
    pub bytes: u64,
}

impl Digest256 {
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.bytes += data.len() as u64;
    }

    pub fn hex(self) -> String {
        hex(&self.hasher.finalize())
    }
}

/// A writer that hashes what it forwards.
pub struct HashingWriter<W: Write> {
    pub inner: W,
    pub digest: Digest256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        self.digest.update(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes what it hands on.
pub struct HashingReader<R: Read> {
    pub inner: R,
    pub digest: Digest256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.digest.update(&out[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(key: &SnapshotKey, data: &[u8], chunk: usize) -> Vec<u8> {
        let mut w = SealWriter::new(key, Vec::new(), chunk).unwrap();
        // Odd write sizes, to cross chunk borders in every way.
        for part in data.chunks(7) {
            w.write_all(part).unwrap();
        }
        w.finish().unwrap()
    }

    fn open(key: &SnapshotKey, sealed: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        OpenReader::new(key, sealed)?.read_to_end(&mut out)?;
        Ok(out)
    }

    fn kind(err: io::Error) -> OpenError {
        open_error(&err)
            .cloned()
            .unwrap_or_else(|| panic!("not an OpenError: {err}"))
    }

    #[test]
    fn round_trips_at_every_length_around_chunk_borders() {
        let key = SnapshotKey::new([3; 32]);
        for len in [0, 1, 63, 64, 65, 127, 128, 129, 1000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let sealed = seal(&key, &data, 64);
            assert_eq!(open(&key, &sealed).unwrap(), data, "length {len}");
        }
    }

    #[test]
    fn a_wrong_key_is_named_not_guessed() {
        let sealed = seal(&SnapshotKey::new([1; 32]), b"hello", 64);
        let err = open(&SnapshotKey::new([2; 32]), &sealed).unwrap_err();
        assert!(matches!(kind(err), OpenError::WrongKey { .. }));
    }

    #[test]
    fn a_keyring_opens_objects_of_each_of_its_keys() {
        let (a, b) = (SnapshotKey::new([1; 32]), SnapshotKey::new([2; 32]));
        let ring = [b.clone(), a.clone()];
        for key in [&a, &b] {
            let sealed = seal(key, b"hello", 64);
            let mut out = Vec::new();
            OpenReader::with_keys(&ring, sealed.as_slice())
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
            assert_eq!(out, b"hello");
        }
        let other = seal(&SnapshotKey::new([3; 32]), b"x", 64);
        let err = OpenReader::with_keys(&ring, other.as_slice())
            .err()
            .expect("an unknown key");
        let message = err.to_string();
        assert!(
            message.contains(&SnapshotKey::new([3; 32]).id())
                && message.contains("SNAPSHOT_KEY_FILES"),
            "{message}"
        );
    }

    #[test]
    fn truncation_at_a_chunk_border_and_inside_a_chunk_fails() {
        let key = SnapshotKey::new([5; 32]);
        let data = vec![9u8; 64 * 3 + 10];
        let sealed = seal(&key, &data, 64);
        let at_border = &sealed[..HEADER_LEN + 2 * (64 + TAG_LEN)];
        assert_eq!(
            kind(open(&key, at_border).unwrap_err()),
            OpenError::Truncated(2)
        );
        let inside = &sealed[..sealed.len() - 5];
        assert!(matches!(
            kind(open(&key, inside).unwrap_err()),
            OpenError::Corrupted(_)
        ));
        // Dropping the short final chunk entirely is a truncation too.
        let no_last = &sealed[..HEADER_LEN + 3 * (64 + TAG_LEN)];
        assert_eq!(
            kind(open(&key, no_last).unwrap_err()),
            OpenError::Truncated(3)
        );
    }

    #[test]
    fn a_flipped_bit_anywhere_fails() {
        let key = SnapshotKey::new([6; 32]);
        let sealed = seal(&key, &[1u8; 300], 64);
        for at in [20, HEADER_LEN + 3, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 0x10;
            assert!(open(&key, &bad).is_err(), "flip at {at}");
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(open(&key, &longer).is_err());
    }

    #[test]
    fn each_object_has_its_own_salt() {
        let key = SnapshotKey::new([8; 32]);
        assert_ne!(seal(&key, b"same", 64), seal(&key, b"same", 64));
    }
}
