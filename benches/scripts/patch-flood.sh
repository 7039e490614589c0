#!/usr/bin/env bash
# Edged podpatch flood: N status patches of one stored pod from edged, through mosquitto_pub -l
# at QoS 1 into the embedded broker, with the cloud connected; prints the rate at which every
# ack reached edged, and the peak RSS. Usage: benches/scripts/patch-flood.sh BINARY [N] [PORT]
# (needs mosquitto-clients, jq and python3; run from the repository root).
set -u
BIN=$1; N=${2:-20000}; PORT=${3:-18870}
D=$(mktemp -d /tmp/patch-flood.XXXX)
cat > $D/edge.yaml <<YAML
node_id: bench
mqtt: {mode: embedded, port: $PORT}
database: {path: $D/db.sqlite}
http: {enabled: false}
YAML
$BIN --config $D/edge.yaml > $D/log 2>&1 &
MM=$!
sleep 1.5
T=edge/bench
jq -c '{header:{msg_id:"ins-1"},route:{source:"edgehub",group:"meta",operation:"insert",resource:"default/pod/p"},content:(.metadata.name="p")}' tests/fixtures/pod.json | mosquitto_pub -p $PORT -q 1 -t $T/edgehub/to/metamanager -s
mosquitto_pub -p $PORT -q 1 -t $T/edgehub/to/metamanager -m '{"header":{"msg_id":"c-1"},"route":{"source":"edgehub","group":"meta","operation":"connect","resource":"default/node/bench"},"content":"cloud_connected"}'
sleep 0.5
python3 - "$N" > $D/patches <<'PY'
import json,sys
n=int(sys.argv[1])
for i in range(n):
    m={"header":{"msg_id":f"p-{i}"},"route":{"source":"edged","group":"meta","operation":"patch","resource":"default/podpatch/p"},
       "content":{"status":{"conditions":[{"type":"Ready","status":"True" if i%2 else "False"}],"containerStatuses":[{"name":"nginx","restartCount":i}]}}}
    print(json.dumps(m,separators=(",",":")))
PY
mosquitto_sub -p $PORT -q 1 -t $T/metamanager/to/edged -C $N -F '%p' > $D/acks &
SUB=$!
sleep 0.5
START=$(date +%s.%N)
mosquitto_pub -p $PORT -q 1 -t $T/edged/to/metamanager -l < $D/patches
wait $SUB
END=$(date +%s.%N)
RSS=$(grep VmHWM /proc/$MM/status | awk '{print $2}')
kill $MM; wait $MM 2>/dev/null
OK=$(grep -c '"content":"OK"' $D/acks)
python3 -c "print(f'{$N/($END-$START):.0f} patches/s  ({$OK} acks, peak RSS {int($RSS)/1024:.1f} MiB)')"
rm -rf $D
