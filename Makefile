# Build and install qga: the Python package and its commands, the systemd
# unit, the udev rule, the sample configuration and the man pages.
#
#   make                     build the wheel and the generated man page
#   make install             install everything (as root, or with DESTDIR)
#   make install LAYOUT=fedora DESTDIR=/tmp/root
#
# LAYOUT picks where systemd and udev files go: debian (/lib/...) or fedora
# (/usr/lib/...); it defaults to the system we run on.  Every directory can
# also be set on its own.  Nothing is fetched from the network: the wheel is
# installed without dependencies (the distribution provides python3-psutil,
# python3-jsonschema, python3-cryptography and python3-serial).

PYTHON ?= python3
LAYOUT ?= $(if $(wildcard /etc/debian_version),debian,fedora)
DESTDIR ?=
PREFIX ?= /usr
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib
SYSCONFDIR ?= /etc
MANDIR ?= $(PREFIX)/share/man
BUILDDIR ?= build

ifeq ($(LAYOUT),debian)
UNITDIR ?= /lib/systemd/system
UDEVDIR ?= /lib/udev/rules.d
else ifeq ($(LAYOUT),fedora)
UNITDIR ?= /usr/lib/systemd/system
UDEVDIR ?= /usr/lib/udev/rules.d
else
$(error LAYOUT must be debian or fedora, not '$(LAYOUT)')
endif

# Where the Python package goes follows the interpreter, not LAYOUT.  The
# distributions' Pythons put pip's installs under /usr/local unless they are
# told a package is being built (Debian: DEB_PYTHON_INSTALL_LAYOUT, then
# /usr/lib/python3/dist-packages; Fedora: RPM_BUILD_ROOT), and Debian's turns
# --prefix=/usr/local into /usr/local/local: so /usr/local is their default
# and any other prefix is a package build.
ifeq ($(PREFIX),/usr/local)
PIP_INSTALL = $(PIP) install
else
PIP_INSTALL = DEB_PYTHON_INSTALL_LAYOUT=deb RPM_BUILD_ROOT=$(or $(DESTDIR),/) $(PIP) install --prefix=$(PREFIX)
endif

# The wheel is built with the setuptools (>= 61) and wheel installed for
# $(PYTHON), offline.  PIP_WHEEL_FLAGS= lets pip fetch them into an isolated
# build environment instead.
PIP_WHEEL_FLAGS ?= --no-build-isolation --no-index
PIP = PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 $(PYTHON) -m pip
WHEEL_STAMP = $(BUILDDIR)/wheel/.built
MAN_PAGES = contrib/man/qga.8 contrib/man/qgactl.8 contrib/man/qga.conf.5 \
	contrib/man/qga-client.1 contrib/man/qga-bundle.1 $(BUILDDIR)/man/qga-ref.7
SOURCES = pyproject.toml README.md qapi-schema.json $(shell find qga -name '*.py' -o -name '*.json')

.PHONY: all wheel man install install-python install-data clean

all: wheel man

wheel: $(WHEEL_STAMP)

man: $(BUILDDIR)/man/qga-ref.7

# The wheel is built from a copy of the sources with links resolved, so
# qga/qapi-schema.json (a link to the root file) goes in as a real file and
# the working tree gets no build/ or egg-info of setuptools'.
$(WHEEL_STAMP): $(SOURCES)
	rm -rf $(BUILDDIR)/src $(BUILDDIR)/wheel
	mkdir -p $(BUILDDIR)/src $(BUILDDIR)/wheel
	tar -ch --exclude=__pycache__ pyproject.toml README.md qapi-schema.json qga \
		| tar -x -C $(BUILDDIR)/src
	$(PIP) wheel -q --no-deps $(PIP_WHEEL_FLAGS) -w $(BUILDDIR)/wheel $(BUILDDIR)/src
	touch $@

$(BUILDDIR)/man/qga-ref.7: qapi-schema.json qga/docs.py qga/schema.py
	mkdir -p $(BUILDDIR)/man
	PYTHONPATH=. $(PYTHON) -m qga.docs -o $@ qapi-schema.json

install: install-python install-data

install-python: $(WHEEL_STAMP)
	$(PIP_INSTALL) -q --no-deps --no-index --no-warn-script-location \
		--root=$(or $(DESTDIR),/) $(BUILDDIR)/wheel/qga-*.whl

# The unit names /usr/bin and /etc/qga; other prefixes are written in.
install-data: man
	install -d $(DESTDIR)$(UNITDIR) $(DESTDIR)$(UDEVDIR) $(DESTDIR)$(SYSCONFDIR)/qga \
		$(DESTDIR)$(SYSCONFDIR)/qga/trust.d $(DESTDIR)$(LIBDIR)/qga/trust.d
	sed -e 's|/usr/bin/|$(BINDIR)/|g' -e 's|/etc/qga/|$(SYSCONFDIR)/qga/|g' \
		contrib/qga.service > $(DESTDIR)$(UNITDIR)/qga.service
	chmod 644 $(DESTDIR)$(UNITDIR)/qga.service
	install -m 644 contrib/udev/99-qga.rules $(DESTDIR)$(UDEVDIR)/99-qga.rules
	# An admin's configuration is never overwritten.
	test -e $(DESTDIR)$(SYSCONFDIR)/qga/qga.conf \
		|| install -m 644 contrib/qga.conf $(DESTDIR)$(SYSCONFDIR)/qga/qga.conf
	for page in $(MAN_PAGES); do \
		section=$${page##*.}; \
		install -d $(DESTDIR)$(MANDIR)/man$$section || exit 1; \
		install -m 644 $$page $(DESTDIR)$(MANDIR)/man$$section/ || exit 1; \
	done

clean:
	rm -rf $(BUILDDIR)
