"""The S3 front-end of a site: `server` (aiohttp, the operations), `auth` (SigV4, SigV2, aws-chunked),
`store` (buckets, objects in pieces, multipart, garbage over the site's backend). See docs/s3.md."""
