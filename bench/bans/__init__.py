"""`python -m bench.bans`: issue 20's targets for bans, measured on gateways this tool starts itself.

Three parts, each on deployments of its own (a private RabbitMQ vhost each, deleted at the end,
so its ban stream goes with it and flapping is counted by its own workers, the partition owners):

  reach      two instances of one deployment hold the devices half each; bans go through
             instance A's API for devices held on B: p99 from the 200 to the device reading
             `banned` (target <= 1 s)
  in-force   a deployment with --in-force bans next to one with none: CPU per session set-up
             of devices not banned, the two alternated (A B B A ...) in the same run (target:
             within 5 %), and gateway RSS per ban
  flapping   1 % of the devices reconnect once a second: gateway CPU with flapping detection
             off (FLAP_MAX=0) next to on (FLAP_MAX/FLAP_WINDOW/FLAP_BAN defaults)

Layout: deploy.py (vhosts, gateway instances, the HTTP API and /metrics), parts.py (the three
measurements, on bench.stampede's controller, load workers and ramp), output.py (what is printed,
the JSON and the PNG). The devices are bench.stampede's; they report when a session ends with
`banned` (controller.Fleet.banned_at), and the `flap` command makes some reconnect every second.
"""
