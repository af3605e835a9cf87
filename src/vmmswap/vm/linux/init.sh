#!/bin/sh
# /init of the vmmswap Linux guest (busybox-static). The workload mirrors crosvm's vmm-swap e2e
# check: random data goes into tmpfs, and its sha256 is printed once, then again each time the host
# asks, so the host can tell whether guest memory survived enable -> trim -> out -> disable.
#
# Serial protocol, one line each way (guest lines start with VMMSWAP- so that the host can pick
# them out of the kernel's own console output):
#   host: "ping N"      guest: "VMMSWAP-PONG N"
#   host: "check N"     guest: "VMMSWAP-SHA256 N <hex>"      (re-reads the file on vCPU 0)
#   host: "poweroff"    guest: "VMMSWAP-BYE", then a write to the power-off port
#   guest on its own:   "VMMSWAP-READY uptime=<s> cpus=<n>", "VMMSWAP-SHA256 initial <hex>",
#                       "VMMSWAP-PERIODIC K <hex>" every vmmswap_period seconds (re-read on vCPU 1)
# Settings come from the kernel command line: the kernel hands unknown name=value words to init
# as environment variables (names without a dot): vmmswap_mb, vmmswap_period, vmmswap_port.

PATH=/bin
export PATH

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
mount -t tmpfs -o mode=1777 tmpfs /tmp
# The host types commands; an echo would interleave them with the guest's answers.
stty -echo 2>/dev/null

ncpu=$(nproc)
echo "VMMSWAP-READY uptime=$(cut -d' ' -f1 /proc/uptime) cpus=$ncpu"

mb=${vmmswap_mb:-32}
period=${vmmswap_period:-0}
port=${vmmswap_port:-1281}
data=/tmp/data

# Runs "sha256sum" of the data file on one vCPU, so that both vCPUs read guest memory.
digest() {
    if [ "$ncpu" -gt "$1" ]; then
        taskset -c "$1" sha256sum "$data" | cut -d' ' -f1
    else
        sha256sum "$data" | cut -d' ' -f1
    fi
}

power_off() {
    sync
    # /dev/port is the guest's port I/O space: one byte to the host's power-off device.
    printf 'P' | dd of=/dev/port bs=1 seek="$port" count=1 conv=notrunc 2>/dev/null
}

if ! dd if=/dev/urandom of="$data" bs=1M count="$mb" 2>/dev/null; then
    echo "VMMSWAP-ERROR cannot write $mb MiB to tmpfs"
    power_off
fi
echo "VMMSWAP-SHA256 initial $(digest 0)"

if [ "$period" -gt 0 ]; then
    (
        k=0
        while sleep "$period"; do
            k=$((k + 1))
            echo "VMMSWAP-PERIODIC $k $(digest 1)"
        done
    ) &
fi

while read -r cmd arg; do
    case "$cmd" in
        ping) echo "VMMSWAP-PONG $arg" ;;
        check) echo "VMMSWAP-SHA256 $arg $(digest 0)" ;;
        poweroff) break ;;
        "") ;;
        *) echo "VMMSWAP-UNKNOWN $cmd" ;;
    esac
done

echo "VMMSWAP-BYE"
power_off
# init must never exit (the kernel panics); wait for the host to stop the vCPUs.
while true; do sleep 3600; done
