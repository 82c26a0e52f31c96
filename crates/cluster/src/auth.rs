//! The agents' shared-token authentication: the token is read from a file only root (or the
//! owner) can read, and every request's `Authorization: Bearer TOKEN` is compared with it in
//! constant time, so that response timing does not leak how much of a guess was right.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use subtle::ConstantTimeEq;

/// Why the token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Reading the file failed.
    #[error("reading the token file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Group or others may read or write it: anyone on the machine could act as the
    /// controller.
    #[error(
        "the token file {path} is accessible to group or others (mode {mode:o}); chmod 600 it"
    )]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// It holds no token (only white space).
    #[error("the token file {path} is empty")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The token is not printable ASCII (it could not travel in an HTTP header).
    #[error("the token in {path} must be printable ASCII without spaces")]
    NotPrintable {
        /// The file.
        path: PathBuf,
    },
}

/// The shared secret between a controller and its agents.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// Reads the token from `path`: its content with surrounding white space trimmed. The
    /// file must not be accessible to group or others, and must hold a non-empty token of
    /// printable ASCII.
    pub fn from_file(path: &Path) -> Result<Token, TokenError> {
        let read = |source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TokenError::TooOpen {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Token::new(text.trim()).map_err(|e| match e {
            TokenError::Empty { .. } => TokenError::Empty {
                path: path.to_path_buf(),
            },
            _ => TokenError::NotPrintable {
                path: path.to_path_buf(),
            },
        })
    }

    /// A token from its text (tests and clients that already hold it).
    pub fn new(text: &str) -> Result<Token, TokenError> {
        if text.is_empty() {
            return Err(TokenError::Empty {
                path: PathBuf::new(),
            });
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::NotPrintable {
                path: PathBuf::new(),
            });
        }
        Ok(Token(text.to_string()))
    }

    /// The value of an `Authorization` header carrying this token.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// True when `header` (an `Authorization` header's value, if any) carries this token.
    /// The comparison takes the same time whatever the header holds, up to its length.
    pub fn accepts(&self, header: Option<&[u8]>) -> bool {
        let Some(given) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        // `ct_eq` on slices of different lengths is false at once; the length of the token
        // is not the secret.
        bool::from(given.ct_eq(self.0.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(mode: u32, text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("token");
        std::fs::write(&p, text).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        (dir, p)
    }

    #[test]
    fn a_private_file_gives_its_trimmed_token() {
        let (_d, p) = file(0o600, "  s3cret\n");
        let t = Token::from_file(&p).expect("token");
        assert_eq!(t.bearer(), "Bearer s3cret");
        assert!(t.accepts(Some(b"Bearer s3cret")));
    }

    #[test]
    fn open_empty_or_missing_files_are_refused() {
        let (_d, p) = file(0o644, "s3cret");
        assert!(matches!(
            Token::from_file(&p),
            Err(TokenError::TooOpen { mode: 0o644, .. })
        ));
        let (_d, p) = file(0o600, " \n");
        assert!(matches!(
            Token::from_file(&p),
            Err(TokenError::Empty { .. })
        ));
        let (_d, p) = file(0o600, "two words");
        assert!(matches!(
            Token::from_file(&p),
            Err(TokenError::NotPrintable { .. })
        ));
        assert!(matches!(
            Token::from_file(Path::new("/nonexistent/token")),
            Err(TokenError::Read { .. })
        ));
    }

    #[test]
    fn only_the_exact_bearer_token_is_accepted() {
        let t = Token::new("s3cret").expect("token");
        for bad in [
            None,
            Some(&b""[..]),
            Some(b"s3cret"),
            Some(b"Bearer "),
            Some(b"Bearer s3cre"),
            Some(b"Bearer s3cret "),
            Some(b"Bearer S3CRET"),
            Some(b"Basic s3cret"),
            Some(b"bearer s3cret"),
        ] {
            assert!(!t.accepts(bad), "{bad:?}");
        }
        assert!(t.accepts(Some(b"Bearer s3cret")));
    }
}
