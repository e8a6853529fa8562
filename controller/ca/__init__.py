"""The mesh CA: key material and issuance (`authority`), node authorization and the gRPC API (`service`)."""
