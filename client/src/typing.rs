//! When to send typing indicators: [`TypingNotifier`] turns "the user
//! typed something" and "the user sent the line" into at most one `TYPING`
//! per [`TypingNotifier::REPEAT`] (the server lets a `TYPING` expire if it
//! is not repeated, and rate-limits them) and one `STOPPED` when the user
//! stops. Pure: the caller passes `now`.

use std::time::Duration;

use tokio::time::Instant;

use crate::v1::TypingState;

/// Rate-limits one conversation's typing indicators.
#[derive(Debug, Default)]
pub struct TypingNotifier {
    /// When the last TYPING went out, while the user is typing.
    typing_since: Option<Instant>,
}

impl TypingNotifier {
    /// A `TYPING` is repeated this often while the user keeps typing
    /// (below the server's expiry, 6 s by default).
    pub const REPEAT: Duration = Duration::from_secs(3);

    /// The user typed at `now`: `Some(TYPING)` if one is due.
    pub fn handle_input(&mut self, now: Instant) -> Option<TypingState> {
        match self.typing_since {
            Some(t) if now.saturating_duration_since(t) < Self::REPEAT => None,
            _ => {
                self.typing_since = Some(now);
                Some(TypingState::Typing)
            }
        }
    }

    /// The user sent or cleared the line: `Some(STOPPED)` if a `TYPING`
    /// went out since the last stop.
    pub fn handle_stop(&mut self) -> Option<TypingState> {
        self.typing_since.take().map(|_| TypingState::Stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typing_at_most_every_repeat_then_one_stop() {
        let t0 = Instant::now();
        let mut n = TypingNotifier::default();
        assert_eq!(n.handle_stop(), None, "nothing to stop yet");
        assert_eq!(n.handle_input(t0), Some(TypingState::Typing));
        for ms in [1, 500, 2999] {
            assert_eq!(n.handle_input(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(
            n.handle_input(t0 + Duration::from_millis(3000)),
            Some(TypingState::Typing)
        );
        assert_eq!(n.handle_stop(), Some(TypingState::Stopped));
        assert_eq!(n.handle_stop(), None);
        // Typing again right after a stop is announced at once.
        assert_eq!(
            n.handle_input(t0 + Duration::from_millis(3001)),
            Some(TypingState::Typing)
        );
    }
}
