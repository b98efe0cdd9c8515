#!/bin/sh
# telegraf-omnicore postremove (the .deb's postrm and the .rpm's %postun).
#
# Removing the package keeps the state directory /var/lib/telegraf-omnicore:
# it may hold spooled metrics that were never delivered. A Debian purge
# removes it only when it is empty. The configuration files are the package
# manager's: kept on remove, deleted by a purge.
set -e

if [ "$1" = purge ]; then
	rmdir /var/lib/telegraf-omnicore 2>/dev/null || true
fi

if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
	systemctl daemon-reload || true
fi
