"""NBD frontend: obd stacks served by nbdkit's Python plugin (docs/nbd.md).

``plugin.py`` is the script nbdkit loads (:func:`obd.host.nbdkit.plugin_path` finds it without
importing this package); ``backend.py`` holds the plugin's callbacks over the engine's
:class:`obd.image.device.Device` and is what tests import. Start a server with ``obd nbd IMAGE
--socket PATH`` or, by hand, ``nbdkit python frontends/nbd/plugin.py image=IMAGE [upper=DIR]``.
"""
