"""OCI images: the data model (:mod:`.model`) and image layouts on disk (:mod:`.layout`)."""
