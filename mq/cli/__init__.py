"""What conf/ offers and how it is read: the config groups and their options (conf), the key
types (schema), ``--help`` (helptext) and the resolvers that name folders (dirname). Free of
torch: Hydra's plugin scan and the sweeper import it."""
