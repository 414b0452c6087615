#!/bin/sh
# /init of the end-to-end test guest (PID 1 in a cpio initramfs, busybox only).
#
# Kernel command line switches (read from /proc/cmdline):
#   qga_agent=qga|qemu-ga|none   which agent serves the virtio-serial port
#   qga_ports=N                  how many named virtio-serial ports to wait for
#                                (default 1: the agent's own)
# The agent runs in a restart loop, its output on the serial console, so a
# crash shows up in the console log and the port comes back.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root

mount -t proc proc /proc
echo "e2e-init: init started, uptime $(cut -d" " -f1 /proc/uptime) s" > /dev/console
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /tmp
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
hostname -F /etc/hostname
ip link set lo up

for module in $(cat /etc/e2e/modules); do
    insmod "/lib/modules/e2e/$module.ko" 2>/dev/null
done

agent=qga
ports=1
for word in $(cat /proc/cmdline); do
    case "$word" in
        qga_agent=*) agent=${word#qga_agent=} ;;
        qga_ports=*) ports=${word#qga_ports=} ;;
    esac
done

# No udev here: name the virtio-serial ports ourselves.  The ports and their
# name attributes appear asynchronously, one by one, shortly after
# virtio_console is loaded: wait (200 rounds of 10 ms at most) for all of them.
mkdir -p /dev/virtio-ports
tries=0
while [ $tries -lt 200 ]; do
    found=0
    for port in /sys/class/virtio-ports/vport*; do
        [ -r "$port/name" ] || continue
        name=$(cat "$port/name")
        [ -n "$name" ] || continue
        ln -sf "../$(basename "$port")" "/dev/virtio-ports/$name"
        found=$((found + 1))
    done
    [ $found -ge "$ports" ] && break
    tries=$((tries + 1))
    usleep 10000
done

# An interface with an address and a MAC for guest-network-get-interfaces,
# without any traffic leaving the guest.
# Loading the module made an interface with a random MAC: replace it with ours.
ip link del dummy0 2>/dev/null
if ip link add eth0 type dummy 2>/dev/null; then
    ip link set eth0 address 52:54:00:e2:e2:01
    ip addr add 192.0.2.10/24 dev eth0
    ip link set eth0 up
fi

# The virtio data disk (ext4 made on the host): something real for fsinfo and freeze.
mkdir -p /mnt/data
if [ -b /dev/vda ]; then
    mount -t ext4 /dev/vda /mnt/data
fi

port=/dev/virtio-ports/org.qemu.guest_agent.0
mkdir -p /run/qga-state
case "$agent" in
    qemu-ga) command="/usr/sbin/qemu-ga -m virtio-serial -p $port -t /run/qga-state" ;;
    qga) command="env PYTHONPATH=/opt/qga /usr/bin/python3 -m qga -m virtio-serial -p $port -t /run/qga-state" ;;
    *) command="" ;;
esac

if [ -n "$command" ]; then
    (
        while :; do
            echo "e2e-init: starting $agent, uptime $(cut -d" " -f1 /proc/uptime) s" > /dev/console
            $command < /dev/null > /dev/console 2>&1
            echo "e2e-init: $agent exited with status $?" > /dev/console
            sleep 1
        done
    ) &
fi
echo "e2e-init: ready, uptime $(cut -d" " -f1 /proc/uptime) s" > /dev/console

while :; do
    sleep 3600
done
