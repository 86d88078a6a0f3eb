"""The batch job (`job`: Ray Data over an actor pool of model replicas): `inputs` parsed into rows, the `replica`,
and the accounting that makes every input row come out once."""
