"""Smoke test of the load tool: a few hundred devices against the floor echo server, in seconds.

It proves the tool runs end to end (workers, progress, JSON, PNG), not how fast
anything is. The tests marked `gateway` run it against a real gunicorn gateway on
RabbitMQ (conftest's `gateway` fixture), with JSON and with MQTT devices, and the
suite against gateways it starts itself. The tool's MQTT client codec is checked
against the gateway's own codec (app.mqtt), each decoding what the other encodes.
Over TLS (a gateway with a trustme certificate) the devices resume their sessions
after a mass drop, and a device that does not trust the server counts a failed
handshake rather than a session.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from app import mqtt
from bench.stampede import mqtt_codec
from support.gateways import AMQP_URL, API_TOKEN, SECRET, Gateway, free_port, start_gateway
from support.tls_devices import Pki

ROOT = Path(__file__).resolve().parent.parent
DEVICES = 300


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


@pytest.fixture
def floor() -> Iterator[str]:
    """A floor echo server with two workers on a free port, stopped afterwards."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bench.floor", "--port", str(port),
                               "--workers", "2"], cwd=ROOT)
    try:
        wait_for_port(port)
        yield f"tcp://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


def run_stampede(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.stampede", *args], cwd=ROOT, check=False,
                          capture_output=True, text=True, timeout=timeout)


def run_suite(out: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """The suite with two workers on the test RabbitMQ and free ports, writing under `out`'s name."""
    return run_stampede("suite", *args, "--workers", "2", "--secret", SECRET, "--amqp-url", AMQP_URL,
                        "--floor-port", str(free_port()), "--device-port", str(free_port()),
                        "--http-port", str(free_port()), "--settle", "0.5", "--ramp-timeout", "30",
                        "--out", str(out), timeout=timeout)


def test_every_device_reaches_the_floor_and_results_are_written(floor: str, tmp_path: Path) -> None:
    out = tmp_path / "ramp.json"
    done = run_stampede("stampede", "--floor", floor, "--devices", str(DEVICES),
                        "--processes", "2", "--jitter", "1", "--settle", "0.5",
                        "--ramp-timeout", "30", "--out", str(out))
    assert done.returncode == 0, done.stderr
    results = orjson.loads(out.read_bytes())
    floor_figures = results["runs"]["floor"]
    assert floor_figures["ramp"]["up"] == DEVICES
    assert floor_figures["ramp"]["failures"] == {}
    for jitter in ("0", "1"):
        assert floor_figures[f"reconnect_jitter_{jitter}s"]["all_back"]
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert "sessions_per_s" in done.stdout
    assert "up" in done.stderr  # the live progress lines


def test_the_floor_hold_counts_the_heartbeats_it_answers(floor: str, tmp_path: Path) -> None:
    out = tmp_path / "hold.json"
    heartbeat = 2.0
    done = run_stampede("hold", "--floor", floor, "--devices", str(DEVICES), "--processes", "2",
                        "--heartbeat", str(heartbeat), "--quiet", "4", "--settle", "0.5",
                        "--ramp-timeout", "30", "--out", str(out))
    assert done.returncode == 0, done.stderr
    results = orjson.loads(out.read_bytes())
    hold = results["runs"]["floor"]["hold"]
    expected = DEVICES * hold["idle_seconds"] / heartbeat
    assert 0.5 < hold["idle_heartbeats_answered"] / expected < 1.5
    assert hold["cpu_ms_per_heartbeat"] is not None
    assert "commands" not in hold  # the floor has no command path: its hold is the idle window
    assert results["per_unit"]["floor"]["heartbeats"] == hold["idle_heartbeats_answered"]
    assert "CPU per heartbeat" in done.stdout


def device_url(gateway: Gateway, transport: str) -> str:
    return {"tcp": gateway.tcp, "mqtt": f"mqtt://127.0.0.1:{gateway.mqtt_port}",
            "mqtt-ws": f"mqtt+ws://127.0.0.1:{gateway.port}/mqtt"}[transport]


@pytest.mark.gateway
@pytest.mark.parametrize("transport", ["tcp", "mqtt", "mqtt-ws"])
def test_a_real_gateway_answers_every_command_and_loses_no_acked_event(
        gateway: Gateway, tmp_path: Path, transport: str) -> None:
    out = tmp_path / "hold.json"
    # A 2 s heartbeat: an MQTT keep alive of 2 s (the gateway cuts a session silent for 3 s).
    done = run_stampede("hold", "--target", device_url(gateway, transport), "--devices", str(DEVICES),
                        "--secret", SECRET, "--amqp-url", AMQP_URL, "--api-token", API_TOKEN,
                        "--prefix", f"smoke{transport.replace('-', '')}{gateway.port}",
                        "--gateway-pid", str(gateway.process.pid),
                        "--duration", "3", "--quiet", "3", "--heartbeat", "2", "--settle", "0.5",
                        "--command-rate", "30",
                        "--event-rate", "30", "--ramp-timeout", "30", "--out", str(out))
    assert done.returncode == 0, done.stderr
    figures = orjson.loads(out.read_bytes())["runs"]["gateway"]
    assert figures["ramp"]["up"] == DEVICES
    assert figures["ramp"]["failures"] == {}
    commands, events = figures["hold"]["commands"], figures["hold"]["events"]
    assert commands["sent"] > 0
    assert commands["outcomes"] == {"ok": commands["sent"]}
    assert events["acked"] > 0
    assert events["acked_but_not_consumed"] == 0
    assert figures["hold"]["lost_sessions"] == {}
    assert figures["ramp"]["rss_kib_per_session"] is not None
    assert figures["hold"]["idle_heartbeats_answered"] > 0
    assert commands["cpu_ms_per_command"] is not None
    assert events["cpu_ms_per_event"] is not None


@pytest.mark.gateway
def test_mqtt_devices_refused_at_connect_are_counted_by_connack_code(gateway: Gateway, tmp_path: Path) -> None:
    done = run_stampede("ramp", "--target", device_url(gateway, "mqtt"), "--devices", "20",
                        "--secret", "not-the-gateway-secret", "--prefix", f"smokebad{gateway.port}",
                        "--commands-via", "none", "--settle", "0.2", "--ramp-timeout", "2",
                        "--out", str(tmp_path / "ramp.json"))
    assert done.returncode == 0, done.stderr
    ramp = orjson.loads((tmp_path / "ramp.json").read_bytes())["runs"]["gateway"]["ramp"]
    assert ramp["up"] == 0
    assert set(ramp["failures"]) == {"connack:0x05"}


@pytest.mark.gateway
@pytest.mark.slow
def test_the_suite_compares_mqtt_with_tcp_on_fresh_gateways(tmp_path: Path) -> None:
    out = tmp_path / "both.json"
    done = run_suite(out, "--scenarios", "ramp", "--transport", "tcp,mqtt", "--devices", "200")
    assert done.returncode == 0, done.stderr
    results = orjson.loads((tmp_path / "both-ramp.json").read_bytes())
    assert list(results["runs"]) == ["floor", "tcp", "mqtt"]
    assert results["targets"]["mqtt"][0].startswith("mqtt://")
    for label in ("floor", "tcp", "mqtt"):
        assert results["runs"][label]["ramp"]["up"] == 200
    assert set(results["per_unit"]) == {"floor", "tcp", "mqtt", "tcp/floor", "mqtt/floor", "mqtt/tcp"}
    assert results["per_unit"]["mqtt/tcp"]["setup_cpu_us"] > 0
    assert "mqtt/tcp" in done.stdout
    assert (tmp_path / "both.md").read_text().count("### ramp") == 1


def test_the_suite_starts_nothing_on_a_port_another_server_listens_on(tmp_path: Path) -> None:
    # gunicorn listens with SO_REUSEPORT: a second gateway on the same port would share it, not fail.
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("0.0.0.0", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_stampede("suite", "--scenarios", "ramp", "--devices", "10", "--floor-port", str(free_port()),
                            "--device-port", str(port), "--http-port", str(free_port()),
                            "--out", str(tmp_path / "taken.json"), timeout=60)
    assert done.returncode != 0
    assert f"port {port} (--device-port) is in use" in done.stderr
    assert not list(tmp_path.glob("taken*"))


def test_the_gateway_decodes_what_the_tool_sends() -> None:
    decoder = mqtt.MqttDecoder(65536)
    stream = b"".join((mqtt_codec.connect("lock-1", "ab12", 30), mqtt_codec.subscribe(7, "commands/#", 1),
                       mqtt_codec.publish("events/bench.tick", b'{"seq":1}', 8), mqtt_codec.puback(9),
                       mqtt_codec.publish("replies/c-1", b"x" * 300, 10), mqtt_codec.PINGREQ))
    packets = decoder.feed(stream[:5]) + decoder.feed(stream[5:])
    connect, subscribe, event, ack, reply, ping = packets
    assert (connect.client_id, connect.password, connect.keep_alive, connect.clean_session) == (
        "lock-1", b"ab12", 30, True)
    assert (subscribe.packet_id, subscribe.filters) == (7, [("commands/#", 1)])
    assert (event.topic, event.payload, event.qos, event.packet_id) == ("events/bench.tick", b'{"seq":1}', 1, 8)
    assert ack.packet_id == 9
    assert (reply.topic, len(reply.payload), reply.packet_id) == ("replies/c-1", 300, 10)
    assert isinstance(ping, mqtt.PingReq)


def test_the_tool_parses_what_the_gateway_sends_however_it_is_split() -> None:
    stream = b"".join((mqtt.connack(0), mqtt.suback(3, [1]), mqtt.publish("commands/unlock", b"y" * 200, 1, 4),
                       mqtt.puback(5), mqtt.pingresp()))
    expected = [(mqtt_codec.CONNACK, 0), (mqtt_codec.SUBACK, 3, b"\x01"),
                (mqtt_codec.PUBLISH, "commands/unlock", b"y" * 200, 4), (mqtt_codec.PUBACK, 5),
                (mqtt_codec.PINGRESP,)]
    for split in range(len(stream) + 1):
        first, rest = mqtt_codec.parse(stream[:split])
        second, left = mqtt_codec.parse(rest + stream[split:])
        assert (first + second, left) == (expected, b"")


def test_the_tool_gives_up_on_a_packet_a_server_never_sends() -> None:
    with pytest.raises(mqtt_codec.ProtocolViolation):
        mqtt_codec.parse(mqtt_codec.connect("lock-1", "ab12", 30))


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Pki]]:
    """A two-worker gateway serving TLS (DEVICE_TLS_PORT and HTTPS_PORT) with a throw-away certificate."""
    pki = Pki.make(tmp_path_factory.mktemp("stampede-pki"))
    gateway = start_gateway(tmp_path_factory.mktemp("stampede-tls"), workers=2, **pki.tls_env())
    try:
        yield gateway, pki
    finally:
        gateway.stop()


def tls_url(gateway: Gateway, transport: str) -> str:
    if transport == "tls":
        return f"tls://127.0.0.1:{gateway.env['DEVICE_TLS_PORT']}"
    return f"wss://127.0.0.1:{gateway.env['HTTPS_PORT']}/ws"


@pytest.mark.gateway
@pytest.mark.parametrize("transport", ["tls", "wss"])
def test_tls_devices_resume_their_sessions_after_a_mass_drop(
        tls_gateway: tuple[Gateway, Pki], tmp_path: Path, transport: str) -> None:
    gateway, pki = tls_gateway
    out = tmp_path / "stampede.json"
    done = run_stampede("stampede", "--target", tls_url(gateway, transport), "--cafile", pki.path("server-ca.pem"),
                        "--devices", str(DEVICES), "--processes", "2", "--secret", SECRET,
                        "--commands-via", "none", "--prefix", f"smoke{transport}{gateway.port}",
                        "--gateway-pid", str(gateway.process.pid), "--jitter", "0", "--settle", "0.5",
                        "--ramp-timeout", "30", "--out", str(out))
    assert done.returncode == 0, done.stderr
    figures = orjson.loads(out.read_bytes())["runs"]["gateway"]
    ramp, back = figures["ramp"], figures["reconnect_jitter_0s"]
    assert (ramp["up"], ramp["failures"]) == (DEVICES, {})
    assert ramp["tls"] == {"full": DEVICES, "resumed": 0, "failed": 0, "resumed_share": 0.0}
    assert back["all_back"] and back["failures"] == {}
    # Each device offered the ticket of its one session: every reconnect resumed it.
    assert back["tls"] == {"full": 0, "resumed": DEVICES, "failed": 0, "resumed_share": 1.0}
    assert "TLS reconnects resumed" in done.stdout


@pytest.mark.gateway
def test_devices_that_do_not_trust_the_server_count_failed_handshakes(
        tls_gateway: tuple[Gateway, Pki], tmp_path: Path) -> None:
    gateway, _ = tls_gateway
    common = ("--target", tls_url(gateway, "tls"), "--devices", "20", "--secret", SECRET, "--commands-via", "none",
              "--prefix", f"smokeuntrusted{gateway.port}", "--settle", "0.2", "--ramp-timeout", "2")
    untrusted = run_stampede("ramp", *common, "--out", str(tmp_path / "untrusted.json"))
    assert untrusted.returncode == 0, untrusted.stderr
    ramp = orjson.loads((tmp_path / "untrusted.json").read_bytes())["runs"]["gateway"]["ramp"]
    assert ramp["up"] == 0
    assert set(ramp["failures"]) == {"tls:certificate_verify_failed"}
    assert ramp["tls"]["failed"] == ramp["failures"]["tls:certificate_verify_failed"] > 0
    insecure = run_stampede("ramp", *common, "--insecure", "--out", str(tmp_path / "insecure.json"))
    assert insecure.returncode == 0, insecure.stderr
    assert orjson.loads((tmp_path / "insecure.json").read_bytes())["runs"]["gateway"]["ramp"]["up"] == 20


@pytest.mark.gateway
@pytest.mark.slow
def test_the_suite_starts_a_tls_gateway_with_its_own_certificate(tmp_path: Path) -> None:
    out = tmp_path / "tls.json"
    done = run_suite(out, "--scenarios", "ramp", "--transport", "tls,wss", "--devices", "100")
    assert done.returncode == 0, done.stderr
    results = orjson.loads((tmp_path / "tls-ramp.json").read_bytes())
    assert results["targets"]["tls"][0].startswith("tls://")
    assert results["targets"]["wss"][0].startswith("wss://")
    for label in ("tls", "wss"):
        assert results["runs"][label]["ramp"]["up"] == 100
        assert results["runs"][label]["ramp"]["tls"]["full"] == 100
    assert results["runs"]["floor"]["ramp"]["tls"] is None  # the floor stays plain
    assert "the floor stays plain" in done.stderr


@pytest.mark.slow
def test_the_node_loss_scenario_kills_a_cluster_node_and_every_device_answers_again(tmp_path: Path) -> None:
    """The suite boots its own three-node cluster (two would lose the routing partitions' majority with a
    node), kills a node under a held fleet, sweeps every device."""
    out = tmp_path / "loss.json"
    done = run_suite(out, "--broker", "single,cluster3", "--scenarios", "node-loss", "--devices", "200",
                     "--command-rate", "200", "--quiet", "2", timeout=300)
    assert done.returncode == 0, done.stderr
    assert "node-loss skipped on the single broker" in done.stderr
    results = orjson.loads((tmp_path / "loss-node-loss.json").read_bytes())
    assert list(results["runs"]) == ["floor", "cluster3"]
    loss = results["runs"]["cluster3"]["node_loss"]
    assert loss["sampled"]["sent_before_loss"] > 0 and loss["sampled"]["failed_before_loss"] == 0
    assert loss["sampled"]["sent_after_loss"] > 0
    assert (loss["sweep"]["answered"], loss["sweep"]["not_answered"]) == (200, {})
    assert loss["sweep"]["started_after_loss_s"] >= 3.0
    assert loss["sessions_lost"] == 0 and loss["up_after"] == 200
    assert loss["after_restore"].get("ok", 0) > 0 and set(loss["after_restore"]) == {"ok"}
    assert (tmp_path / "loss-node-loss-recovery.png").stat().st_size > 0


@pytest.mark.slow
def test_the_worker_kill_scenario_kills_the_busiest_worker_and_its_devices_answer_again(tmp_path: Path) -> None:
    """The suite's gateway has two workers: the one holding more devices is SIGKILLed while commands flow;
    its devices come back (gunicorn starts another worker) and every figure adds up."""
    out = tmp_path / "kill.json"
    done = run_suite(out, "--scenarios", "worker-kill", "--devices", "300", "--command-rate", "100",
                     "--quiet", "2", "--duration", "5", "--jitter", "0", timeout=300)
    assert done.returncode == 0, done.stderr
    results = orjson.loads((tmp_path / "kill-worker-kill.json").read_bytes())
    assert results["runs"]["floor"]["worker_kill"] is None  # an echo server has no commands to miss
    kill = results["runs"]["gateway"]["worker_kill"]
    assert len(kill["devices_per_worker"]) == 2 and sum(kill["devices_per_worker"]) == 300
    assert kill["devices_on_no_worker"] == 0 and kill["replacement_worker_after_s"] is not None
    others, dead = kill["other_workers"], kill["killed_worker"]
    assert (dead["devices"], others["devices"]) == tuple(kill["devices_per_worker"])
    assert others["sent_before_loss"] > 0 and others["sent_after_loss"] > 0
    assert (others["missed_after_loss"], others["sessions_lost"], others["offline_while_connected"]) == (0, 0, 0)
    assert dead["back"] == dead["devices"] and dead["back_never_answered"] == 0
    assert dead["answered_after_comeback_ms"]["n"] == dead["devices"] and dead["offline_while_connected"] == 0
    assert sum(dead["landed_on"].values()) == dead["devices"]
    assert (kill["sweep"]["answered"], kill["sweep"]["not_answered"]) == (dead["devices"], {})
    assert (kill["answered_twice"], kill["up_after"], kill["commands_unsettled"]) == (0, 300, 0)
    assert (tmp_path / "kill-worker-kill-recovery.png").stat().st_size > 0


@pytest.mark.slow
def test_the_mass_reconnect_scenario_cuts_every_device_and_section_2_4_holds_through_it(tmp_path: Path) -> None:
    """Every device's connection cut at once while commands flow: each comes back, its commands after its
    welcome are all answered ok, none twice, and `offline` came only while it was away."""
    out = tmp_path / "mass.json"
    done = run_suite(out, "--scenarios", "mass-reconnect", "--devices", "300", "--command-rate", "100",
                     "--quiet", "2", "--duration", "5", "--jitter", "0", timeout=300)
    assert done.returncode == 0, done.stderr
    results = orjson.loads((tmp_path / "mass-mass-reconnect.json").read_bytes())
    assert results["runs"]["floor"]["mass_reconnect"] is None  # an echo server has no commands
    mass = results["runs"]["gateway"]["mass_reconnect"]
    back = mass["reconnected"]
    assert mass["devices"] == back["devices"] == back["back"] == 300 and back["back_never_answered"] == 0
    assert back["answered_after_comeback_ms"]["n"] == 300 and back["lost_again"] == 0
    assert set(mass["after_comeback"]) == {"ok"} and mass["after_comeback"]["ok"] >= 300
    assert (mass["answered_twice"], mass["offline_while_connected"], mass["late_replies"]) == (0, 0, 0)
    assert mass["commands_by_outcome"]["before_cut"].keys() == {"ok"}
    assert (mass["sweep"]["answered"], mass["sweep"]["not_answered"]) == (300, {})
    assert (mass["up_after"], mass["commands_unsettled"]) == (300, 0)
    assert (tmp_path / "mass-mass-reconnect-recovery.png").stat().st_size > 0
