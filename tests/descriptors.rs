//! Out of file descriptors: MetaManager started with `ulimit -n 128`, then flooded with idle
//! connections to both listeners, the embedded broker's and the HTTP endpoint's. Neither accept
//! loop spins (the process uses little CPU while the flood lasts), and once the flood ends
//! both serve again.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::process::{self, Launch, MetaManager};

/// CPU time (user + system) the process has used, from `/proc/PID/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // The kernel's USER_HZ, 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}

#[test]
fn out_of_descriptors_neither_listener_spins_and_both_recover() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edge.yaml");
    std::fs::write(
        &config,
        "node_id: fd-node\nmqtt:\n  port: 0\nhttp:\n  listen: 127.0.0.1:0\ndatabase:\n  path: data/m.db\n",
    )
    .unwrap();
    let log = dir.path().join("metamanager.log");
    let mut mm = MetaManager::start(Launch {
        config: Some(&config),
        cwd: Some(dir.path()),
        rust_log: Some("info,rumqttd=warn"),
        log: Some(&log),
        open_files: Some(128),
        private_network: false,
    });
    let (broker, http) = mm.wait_for_log(Duration::from_secs(20), "both ports", |log| {
        Some((process::broker_port(log)?, process::http_port(log)?))
    });
    assert!(mm.log().contains("open_files=128"), "{}", mm.log());

    // Idle connections, more than the process has descriptors: the kernel completes them,
    // the listeners accept until they run out, and the rest wait in the backlogs.
    let mut flood = Vec::new();
    for i in 0..300 {
        let port = if i % 2 == 0 { broker } else { http };
        if let Ok(c) = TcpStream::connect(("127.0.0.1", port)) {
            flood.push(c);
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let before = cpu_time(mm.pid());
    let measured = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_time(mm.pid()) - before;
    let share = used.as_secs_f64() / measured.elapsed().as_secs_f64();
    eprintln!(
        "CPU while out of descriptors: {used:?} in 3 s ({:.0} %)",
        share * 100.0
    );
    assert!(
        share < 0.3,
        "an accept loop spins: {:.0} % CPU",
        share * 100.0
    );
    assert!(mm.still_running(), "{}", mm.log());

    // The flood ends; both listeners serve again.
    drop(flood);
    let served = process::wait_until(Duration::from_secs(20), || {
        http_ok(http) && mqtt_connects(broker)
    });
    assert!(
        served,
        "not serving again after the flood; log:\n{}",
        mm.log()
    );
}

/// `GET /healthz` answers 200.
fn http_ok(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    if c.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = c.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}

/// An MQTT client can connect (CONNACK accepted).
fn mqtt_connects(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    let id = b"fd-probe";
    let mut connect = vec![0x10, 12 + id.len() as u8, 0, 4];
    connect.extend_from_slice(b"MQTT");
    connect.extend_from_slice(&[4, 2, 0, 60, 0, id.len() as u8]);
    connect.extend_from_slice(id);
    let mut connack = [0u8; 4];
    c.write_all(&connect).is_ok()
        && c.read_exact(&mut connack).is_ok()
        && connack == [0x20, 2, 0, 0]
}
