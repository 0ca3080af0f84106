//! RSET, NOOP, QUIT, VRFY, EXPN, HELP.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Flow, Session};
use crate::reply::{Reply, canned};

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(super) fn cmd_rset(&mut self) -> Flow {
        self.txn = None;
        self.reply(&canned::ok());
        Flow::Continue
    }

    pub(super) fn cmd_noop(&mut self) -> Flow {
        self.reply(&canned::ok());
        Flow::Continue
    }

    pub(super) fn cmd_quit(&mut self) -> Flow {
        self.reply(&Reply::new(221, "2.0.0", "Bye"));
        Flow::Close
    }

    /// 252 for everyone: VRFY must not reveal which users exist.
    pub(super) fn cmd_vrfy(&mut self) -> Flow {
        self.reply(&Reply::new(
            252,
            "2.5.0",
            "Cannot VRFY user, but will accept message and attempt delivery",
        ));
        Flow::Continue
    }

    pub(super) fn cmd_expn(&mut self) -> Flow {
        self.reply(&Reply::new(502, "5.5.1", "EXPN not available"));
        Flow::Continue
    }

    pub(super) fn cmd_help(&mut self) -> Flow {
        self.reply(&Reply::new(214, "2.0.0", "See RFC 5321 and RFC 6409"));
        Flow::Continue
    }
}
