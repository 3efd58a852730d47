//! How an error reaches the terminal.

/// The error and its causes joined by ": ", leaving out a cause whose text the message before it
/// already holds (many errors print their source themselves, so `{:#}` said it twice).
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.is_empty() {
            out = text;
        } else if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wraps(std::io::Error);

    impl std::fmt::Display for Wraps {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "out: create directory failed: {}", self.0)
        }
    }

    impl std::error::Error for Wraps {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::AlreadyExists, "File exists");
        let e = anyhow::Error::new(Wraps(io)).context("merging c.yaml into out");
        assert_eq!(
            error_text(&e),
            "merging c.yaml into out: out: create directory failed: File exists"
        );
        let plain = anyhow::anyhow!("disk full").context("writing out");
        assert_eq!(error_text(&plain), "writing out: disk full");
        // A source printed inside its parent's message, not at its end (as tonic's errors do).
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = anyhow::Error::new(Wraps(inner)).context(
            "cannot connect: transport error: out: create directory failed: refused (retrying)",
        );
        assert_eq!(
            error_text(&e),
            "cannot connect: transport error: out: create directory failed: refused (retrying)"
        );
    }
}
