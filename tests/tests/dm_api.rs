//! DMAPI sessions, events and tokens through a real daemon's socket (user events from
//! `send_msg`; the FUSE capture that raises file events comes later).

use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};
use strata_client::dm::*;
use strata_client::Client;
use strata_tests::{is_root, Daemon};

fn call(c: &mut Client, req: DmRequest) -> Result<DmReply, DmError> {
    c.dm(&req, b"").expect("daemon answers")
}

fn session(c: &mut Client, info: &[u8]) -> SessionId {
    match call(
        c,
        DmRequest::CreateSession {
            old: NO_SESSION,
            info: info.to_vec(),
        },
    ) {
        Ok(DmReply::Session { sid }) => sid,
        other => panic!("{other:?}"),
    }
}

fn events(c: &mut Client, sid: SessionId, wait: bool) -> Result<Vec<Message>, DmError> {
    match call(c, DmRequest::GetEvents { sid, max: 16, wait })? {
        DmReply::Events { messages } => Ok(messages),
        other => panic!("{other:?}"),
    }
}

/// A synchronous user message from its own connection, answered in a thread.
fn send_sync(d: &Daemon, sid: SessionId, msg: &[u8]) -> std::thread::JoinHandle<DmReply> {
    let (sock, msg) = (d.socket(), msg.to_vec());
    std::thread::spawn(move || {
        let mut c = Client::connect(sock).unwrap();
        c.dm(&DmRequest::SendMsg { sid, sync: true }, &msg)
            .unwrap()
            .unwrap()
    })
}

#[test]
fn sessions_user_events_and_tokens() {
    let mut d = Daemon::start();
    let mut app = Client::connect(d.socket()).unwrap();
    // sessions: create, query, list; info over 256 bytes is E2BIG
    let sid = session(&mut app, b"hsm app");
    assert_eq!(
        call(&mut app, DmRequest::QuerySession { sid }),
        Ok(DmReply::Info {
            info: b"hsm app".to_vec()
        })
    );
    assert_eq!(
        call(
            &mut app,
            DmRequest::CreateSession {
                old: NO_SESSION,
                info: vec![b'x'; 257]
            }
        ),
        Err(DmError::E2big)
    );
    assert_eq!(
        call(&mut app, DmRequest::QuerySession { sid: 999 }),
        Err(DmError::Einval)
    );
    assert_eq!(
        call(&mut app, DmRequest::Sessions { nelem: None }),
        Ok(DmReply::Sessions { sids: vec![sid] })
    );
    // nothing queued: EAGAIN without DM_EV_WAIT
    assert_eq!(events(&mut app, sid, false), Err(DmError::Eagain));
    // an asynchronous message
    let mut other = Client::connect(d.socket()).unwrap();
    assert_eq!(
        other
            .dm(&DmRequest::SendMsg { sid, sync: false }, b"hello")
            .unwrap(),
        Ok(DmReply::Ok)
    );
    let m = events(&mut app, sid, false).unwrap();
    assert_eq!(m[0].token, INVALID_TOKEN);
    assert_eq!(
        m[0].data,
        EventData::User {
            data: b"hello".to_vec()
        }
    );
    // a synchronous one blocks its sender until the session answers (abort with EIO)
    let sender = send_sync(&d, sid, b"recall please");
    let m = events(&mut app, sid, true).unwrap();
    let token = m[0].token;
    assert_ne!(token, INVALID_TOKEN);
    assert_eq!(
        call(&mut app, DmRequest::Tokens { sid, nelem: None }),
        Ok(DmReply::Tokens {
            tokens: vec![token]
        })
    );
    // a session with outstanding events cannot be destroyed
    assert_eq!(
        call(&mut app, DmRequest::DestroySession { sid }),
        Err(DmError::Ebusy)
    );
    assert_eq!(
        call(
            &mut app,
            DmRequest::Respond {
                sid,
                token,
                response: Response::Abort(libc::EIO)
            }
        ),
        Ok(DmReply::Ok)
    );
    assert_eq!(
        sender.join().unwrap(),
        DmReply::Answered {
            response: Response::Abort(libc::EIO)
        }
    );
    // answered: ESRCH; never issued: EINVAL
    let respond = |c: &mut Client, token| {
        call(
            c,
            DmRequest::Respond {
                sid,
                token,
                response: Response::Continue,
            },
        )
    };
    assert_eq!(respond(&mut app, token), Err(DmError::Esrch));
    assert_eq!(respond(&mut app, 987_654), Err(DmError::Einval));
    assert_eq!(
        call(&mut app, DmRequest::DestroySession { sid }),
        Ok(DmReply::Ok)
    );
    assert!(d.stop());
}

#[test]
fn unanswered_events_time_out_and_sessions_are_assumed() {
    let mut d = Daemon::start_with("[dm]\nevent_timeout_ms = 300\n");
    let mut app = Client::connect(d.socket()).unwrap();
    let sid = session(&mut app, b"a");
    // delivered but not answered: the sender fails with the configured errno, and the
    // session is told that the event was cancelled
    let t0 = Instant::now();
    let sender = send_sync(&d, sid, b"x");
    let m = events(&mut app, sid, true).unwrap();
    let late = m[0].token;
    assert_eq!(
        sender.join().unwrap(),
        DmReply::Answered {
            response: Response::Abort(libc::ETIMEDOUT)
        }
    );
    assert!(t0.elapsed() >= Duration::from_millis(250));
    let m = events(&mut app, sid, false).unwrap();
    assert_eq!(m[0].kind, EventType::Cancel);
    assert!(matches!(m[0].data, EventData::Cancel { token, .. } if token == late));
    // the DM application takes an event, dies, and its successor assumes the session
    let sender = send_sync(&d, sid, b"y");
    let m = events(&mut app, sid, true).unwrap();
    let token = m[0].token;
    drop(app);
    let mut again = Client::connect(d.socket()).unwrap();
    assert_eq!(
        call(
            &mut again,
            DmRequest::CreateSession {
                old: sid,
                info: b"a, restarted".to_vec()
            }
        ),
        Ok(DmReply::Session { sid })
    );
    let m = events(&mut again, sid, false).unwrap();
    assert_eq!(
        m[0].token, token,
        "the outstanding event is delivered again"
    );
    call(
        &mut again,
        DmRequest::Pending {
            sid,
            token,
            delay_ms: 5_000,
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    call(
        &mut again,
        DmRequest::Respond {
            sid,
            token,
            response: Response::Continue,
        },
    )
    .unwrap();
    assert_eq!(
        sender.join().unwrap(),
        DmReply::Answered {
            response: Response::Continue
        }
    );
    assert!(d.stop());
}

#[test]
fn dmapi_needs_privilege() {
    if !is_root() {
        panic!("PREREQUISITE MISSING: this test must run as root to act as an unprivileged user");
    }
    let mut d = Daemon::start();
    let me = std::env::current_exe().unwrap();
    // run this test binary's helper as nobody: it connects and tries a DM call
    let out = std::process::Command::new(me)
        .args([
            "--exact",
            "nobody_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("STRATA_DM_SOCKET", d.socket())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("REFUSED permission"), "{text}");
    assert!(d.stop());
}

/// Run by `dmapi_needs_privilege` as an unprivileged user.
#[test]
fn nobody_helper() {
    let Some(sock) = std::env::var_os("STRATA_DM_SOCKET") else {
        return; // only meaningful as the child of dmapi_needs_privilege
    };
    let mut c = Client::connect(sock).unwrap();
    match c.dm(&DmRequest::Sessions { nelem: None }, b"") {
        Err(strata_client::ClientError::Api(e)) => println!("REFUSED {}", e.kind),
        other => println!("UNEXPECTED {other:?}"),
    }
}

#[test]
fn sessions_survive_a_daemon_restart_and_old_tokens_are_esrch() {
    let mut d = Daemon::start();
    let mut app = Client::connect(d.socket()).unwrap();
    let sid = session(&mut app, b"durable app");
    let sender = send_sync(&d, sid, b"in flight");
    let token = events(&mut app, sid, true).unwrap()[0].token;
    drop(app);
    d.kill9_and_restart();
    // the sender's operation died with the daemon
    assert!(
        sender.join().is_err(),
        "the blocked sender sees its connection fail"
    );
    let mut app = Client::connect(d.socket()).unwrap();
    assert_eq!(
        call(&mut app, DmRequest::QuerySession { sid }),
        Ok(DmReply::Info {
            info: b"durable app".to_vec()
        })
    );
    assert_eq!(
        call(
            &mut app,
            DmRequest::Respond {
                sid,
                token,
                response: Response::Continue
            }
        ),
        Err(DmError::Esrch),
        "a token of the earlier run is not outstanding"
    );
    assert_eq!(events(&mut app, sid, false), Err(DmError::Eagain));
    let other = session(&mut app, b"new");
    assert!(other > sid);
    assert_eq!(
        call(&mut app, DmRequest::DestroySession { sid }),
        Ok(DmReply::Ok)
    );
    d.restart();
    let mut app = Client::connect(d.socket()).unwrap();
    assert_eq!(
        call(&mut app, DmRequest::Sessions { nelem: None }),
        Ok(DmReply::Sessions { sids: vec![other] })
    );
    assert!(d.stop());
}
