"""Extensions: signed bundles the host pushes, verified and unpacked by the core.

The modules, from the bytes up:

:mod:`qga.ext.ustar`      a strict POSIX ustar (+ gzip) reader and a reproducible writer
:mod:`qga.ext.rules`      size limits and the rules for paths inside a bundle
:mod:`qga.ext.manifest`   ``manifest.json``: its closed JSON Schema and typed view
:mod:`qga.ext.bundle`     building, checking and extracting bundle archives
:mod:`qga.ext.statement`  the detached canonical statement, keys and Ed25519 signatures
:mod:`qga.ext.trust`      trusted keys and their scopes, the anti-rollback rule
:mod:`qga.ext.verify`     the verification pipeline: statement, archive, to disk
:mod:`qga.ext.cli`        ``qga-bundle keygen | build | sign | verify | inspect``

What the install pipeline uses::

    from qga.ext.trust import TrustStore
    from qga.ext.verify import verify_bundle, extract_bundle, read_detached

    trust = TrustStore.load()                       # or .load(dirs=[...])
    verified = verify_bundle(archive_path, statement_bytes, signature_bytes, trust,
                             installed_counter=store_counter_or_None,
                             allow_unsigned=config.allow_unsigned_extensions)
    path = extract_bundle(verified, archive_path, staging_dir, "hello-1.0.0")
    verified.manifest.name, .version, .entry_point, .limits, .commands, ...
    verified.counter                                # to record in the store

Every refusal is a :class:`qga.errors.ExtensionError` (see its subtree) with
a message fit to send to the host.  ``cryptography`` and ``jsonschema`` are
imported only when a signature or a manifest is checked.
"""
