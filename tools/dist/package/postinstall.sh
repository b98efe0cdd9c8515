#!/bin/sh
# telegraf-omnicore postinstall (the .deb's postinst and the .rpm's %post).
#
# /var/lib/telegraf-omnicore is the state directory: the output's spool and
# the rendezvous of the connection sharing. telegraf-omnicore refuses a state
# directory that group or others may write, or that is owned by another user
# than itself or root, so it is created here with mode 0750, and given to the
# telegraf user when that user exists (Telegraf's own packages create it). A
# directory someone already gave to another user is left as it is. It is not
# part of the package's files, so removing the package never deletes spooled
# metrics. The drop-in for telegraf.service names the same directory as its
# StateDirectory=, so systemd hands it to the telegraf user even when
# Telegraf is installed after this package.
set -e

state_dir=/var/lib/telegraf-omnicore

if [ ! -e "$state_dir" ] && [ ! -L "$state_dir" ]; then
	mkdir -m 0750 "$state_dir"
fi
if [ -d "$state_dir" ] && [ ! -L "$state_dir" ] &&
	[ "$(stat -c %u "$state_dir")" = 0 ] && id -u telegraf >/dev/null 2>&1; then
	chown "$(id -u telegraf):$(id -g telegraf)" "$state_dir"
fi

# Load the drop-in for telegraf.service (a running Telegraf gets it at its
# next restart, which loading the plugins needs anyway).
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
	systemctl daemon-reload || true
fi
