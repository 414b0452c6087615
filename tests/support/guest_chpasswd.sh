#!/bin/sh
# Stand-in for shadow's chpasswd in the e2e guest (busybox-static has none).
# Reads "user:password" lines on stdin; with -e the password is already
# crypted, otherwise it is hashed with SHA-512 (busybox mkpasswd).
crypted=0
[ "$1" = "-e" ] && crypted=1
while IFS= read -r line; do
    user=${line%%:*}
    password=${line#*:}
    if ! grep -q "^$user:" /etc/shadow; then
        echo "chpasswd: user '$user' does not exist" >&2
        exit 1
    fi
    if [ $crypted = 0 ]; then
        password=$(mkpasswd -m sha512 "$password") || exit 1
    fi
    awk -F: -v OFS=: -v user="$user" -v password="$password" \
        '$1 == user { $2 = password } { print }' /etc/shadow > /etc/shadow.new || exit 1
    chmod 600 /etc/shadow.new
    mv /etc/shadow.new /etc/shadow
done
